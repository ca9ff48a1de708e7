"""Building and running test apps: the tiny models file, test settings, a lifespan-entered app
with an async httpx client over ASGI that checks every JSON answer against the route's declared
response model."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.routing import Match

from app.main import create_app
from app.settings import Settings
from models import VOC_CLASSES
from tests import checkpoint_factory as cf

TINY = 1 / 16

#: Names in the tiny models file.
CLASSIFIER = "vgg16-tiny"
DETECTOR = "ssd300-coco-tiny"
VOC_DETECTOR = "ssd300-voc-tiny"


def tiny_models_toml(folder: Path) -> Path:
    """Write three tiny checkpoints (torchvision VGG16, torchvision SSD300 COCO, book SSD300 VOC)
    and a models file listing them; returns the models file."""
    cf.write_torchvision_vgg16(folder / "vgg16.pth", width=TINY)
    cf.write_torchvision_ssd300(folder / "ssd300_coco.pth", width=TINY, confident=True)
    cf.write_book_ssd(folder / "ssd300_voc.pth", width=TINY, confident=True)
    (folder / "voc.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    path = folder / "models.toml"
    path.write_text(
        f"""
[[models]]
name = "{CLASSIFIER}"
task = "classify"
arch = "vgg16"
format = "torchvision"
weights = "vgg16.pth"

[[models]]
name = "{DETECTOR}"
task = "detect"
arch = "ssd300"
format = "torchvision"
weights = "ssd300_coco.pth"
default = true

[[models]]
name = "{VOC_DETECTOR}"
task = "detect"
arch = "ssd300"
format = "ssd.pytorch"
weights = "ssd300_voc.pth"
labels_file = "voc.txt"
score_threshold = 0.6
"""
    )
    return path


def subset_models_file(source: Path, names: Sequence[str], folder: Path) -> Path:
    """A models file in ``folder`` with only the entries of ``source`` named ``names``, in that
    order (paths made absolute, so the checkpoints are the same files)."""
    document = tomllib.loads(source.read_text())
    by_name = {entry["name"]: entry for entry in document["models"]}
    lines = []
    for name in names:
        lines.append("[[models]]")
        for key, value in by_name[name].items():
            if key in ("weights", "labels_file", "calibration_dir"):
                value = str((source.parent / value).resolve())
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    path = folder / f"models-{'-'.join(names)}.toml"
    path.write_text("\n".join(lines))
    return path


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def settings_for(**overrides: Any) -> Settings:
    """Test settings: CPU, no .env, small batches (each batch size is warmed up once per app)."""
    values: dict[str, Any] = {"device": "cpu", "max_batch_size": 2, "max_delay_ms": 2, "decode_threads": 2}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        response = await client.get("/health/ready")
        if response.status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"app not ready after {timeout} s: {response.json()}")


def response_checker(app: FastAPI) -> Any:
    """An httpx response hook: a 2xx JSON answer of a route that declares a ``response_model``
    must validate against it (the models forbid extra fields), so the OpenAPI document, the docs
    and the bytes agree."""
    adapters: dict[str, TypeAdapter[Any]] = {}

    async def check(response: httpx.Response) -> None:
        if (
            not 200 <= response.status_code < 300
            or response.headers.get("content-type") != "application/json"
        ):
            return
        scope = {"type": "http", "path": response.request.url.path, "method": response.request.method}
        for route in app.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] == Match.FULL:
                if route.response_model is not None:
                    key = route.unique_id
                    adapter = adapters.setdefault(key, TypeAdapter(route.response_model))
                    await response.aread()
                    adapter.validate_json(response.content)
                return

    return check


@asynccontextmanager
async def running(app: FastAPI, *, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Enter the app's lifespan and give an ASGI client (answers checked by
    :func:`response_checker`); optionally wait for /health/ready."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://testserver",
            event_hooks={"response": [response_checker(app)]},
        ) as client:
            if ready:
                await wait_ready(client)
            yield client


@asynccontextmanager
async def serve(models_file: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app of ``models_file`` with test settings (``overrides``), ready."""
    app = create_app(settings_for(models_file=models_file, **overrides))
    async with running(app) as client:
        yield client
