"""app/proxy.py: ``X-Forwarded-Prefix`` becomes the root path (/docs, the OpenAPI servers, the
page's files under a proxy's prefix); and every error answer carries ``X-Error-Code``
(``app.errors.error_response``), which deploy/nginx routes by."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from app.errors import ERROR_CODE_HEADER
from app.main import create_app
from app.proxy import forwarded_prefix
from tests.app.harness import running, settings_for
from tests.app.helpers import png


def docs_openapi_url(html: str) -> str:
    (url,) = re.findall(r"url: '([^']+)'", html)
    return str(url)


# -- X-Forwarded-Prefix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "prefix"),
    [
        ("/vision", "/vision"),
        ("/vision/", "/vision"),
        ("/a/b-c/d_e.f~g", "/a/b-c/d_e.f~g"),
        ("vision", ""),  # not a path
        ("/", ""),
        ("/a//b", ""),  # empty segment: "//b" would read as a host
        ("/a/../b", ""),
        ("/a b", ""),
        ("/<script>", ""),
        ("/a'b", ""),
        ("/" + "a" * 300, ""),
    ],
)
def test_forwarded_prefix_takes_plain_paths_only(header: str, prefix: str) -> None:
    assert forwarded_prefix([(b"x-forwarded-prefix", header.encode("latin-1"))]) == prefix


def test_no_header_no_prefix() -> None:
    assert forwarded_prefix([(b"x-forwarded-for", b"10.0.0.1")]) == ""


async def test_docs_openapi_and_page_files_under_the_prefix(client: httpx.AsyncClient) -> None:
    prefixed = {"X-Forwarded-Prefix": "/vision"}
    docs = await client.get("/docs", headers=prefixed)
    assert docs.status_code == 200 and docs_openapi_url(docs.text) == "/vision/openapi.json"
    redoc = await client.get("/redoc", headers=prefixed)
    assert 'spec-url="/vision/openapi.json"' in redoc.text
    schema = (await client.get("/openapi.json", headers=prefixed)).json()
    assert schema["servers"] == [{"url": "/vision"}] and "/v1/classify" in schema["paths"]
    # the page's files are found with the prefix in the root path (a mount under it)
    script = await client.get("/ui/app.js", headers=prefixed)
    assert script.status_code == 200 and "callApi" in script.text
    assert (await client.get("/ui/nope.js", headers=prefixed)).status_code == 404
    # the API itself is unchanged
    models = await client.get("/v1/models", headers=prefixed)
    assert models.status_code == 200 and models.json()["models"]

    # without the header (or with a bad one) nothing moves
    for headers in ({}, {"X-Forwarded-Prefix": "/a b"}):
        plain = await client.get("/docs", headers=headers)
        assert docs_openapi_url(plain.text) == "/openapi.json"
        assert "servers" not in (await client.get("/openapi.json", headers=headers)).json()


async def test_the_key_check_sees_paths_without_the_prefix(tmp_path: Path) -> None:
    app = create_app(settings_for(api_keys="k-1", models_file=tmp_path / "none.toml"))
    async with running(app, ready=False) as client:
        prefixed = {"X-Forwarded-Prefix": "/vision"}
        assert (await client.get("/health/live", headers=prefixed)).status_code == 200  # open path
        page = await client.get("/ui/app.js", headers=prefixed)
        assert page.status_code == 200
        refused = await client.get("/v1/models", headers=prefixed)
        assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHORIZED"


# -- X-Error-Code ---------------------------------------------------------------------------------


async def test_the_services_503s_name_their_code(tmp_path: Path) -> None:
    app = create_app(settings_for(models_file=tmp_path / "none.toml"))
    async with running(app, ready=False) as client:
        for _ in range(200):
            if app.state.service.failure:
                break
            await asyncio.sleep(0.02)
        starting = await client.post("/v1/classify", files={"file": ("a.png", png())})
        assert starting.status_code == 503 and starting.json()["code"] == "NOT_READY"
        assert starting.headers[ERROR_CODE_HEADER] == "NOT_READY"
        app.state.service.draining = True
        leaving = await client.post("/v1/classify", files={"file": ("a.png", png())})
        assert leaving.status_code == 503 and leaving.headers[ERROR_CODE_HEADER] == "DRAINING"
        assert leaving.json()["code"] == "DRAINING"  # the body is untouched


async def test_other_errors_name_their_code_and_answers_do_not(client: httpx.AsyncClient) -> None:
    missing = await client.post("/v1/models/nope/predict", files={"file": ("a.png", png())})
    assert missing.status_code == 404 and missing.headers[ERROR_CODE_HEADER] == "MODEL_NOT_FOUND"
    bad = await client.post("/v1/classify", content=b"not an image", headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and bad.headers[ERROR_CODE_HEADER] == bad.json()["code"]
    good = await client.post("/v1/classify", files={"file": ("a.png", png())})
    assert good.status_code == 200 and ERROR_CODE_HEADER not in good.headers
    no_route = await client.get("/nowhere")
    assert no_route.status_code == 404 and no_route.headers[ERROR_CODE_HEADER] == "NOT_FOUND"


async def test_key_refusals_name_their_code(tmp_path: Path) -> None:
    app = create_app(settings_for(api_keys="k-1", models_file=tmp_path / "none.toml"))
    async with running(app, ready=False) as client:
        refused = await client.get("/v1/models")
        assert refused.status_code == 401 and refused.headers[ERROR_CODE_HEADER] == "UNAUTHORIZED"
