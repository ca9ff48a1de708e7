"""Building and running test apps: the tiny models file, test settings, a lifespan-entered app
with an async httpx client over ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.main import create_app
from app.models_file import ModelsFile
from app.settings import Settings
from models import VOC_CLASSES, Predictor
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


@asynccontextmanager
async def running(app: FastAPI, *, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Enter the app's lifespan and give an ASGI client; optionally wait for /health/ready."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            if ready:
                await wait_ready(client)
            yield client


@asynccontextmanager
async def serve(
    predictors: Sequence[Predictor] | None, models_file: ModelsFile | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(**overrides)
    app = create_app(settings, predictors, defaults=models_file.defaults if models_file else None)
    async with running(app) as client:
        yield client
