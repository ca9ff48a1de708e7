"""API keys (constant-time, several for rotation, open health paths), CORS, the docs switch, and
the audit that nothing a client sends reaches a filesystem path or a URL."""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import KeyRing, presented_key
from tests.app.harness import CLASSIFIER, serve
from tests.app.helpers import jpeg

KEYS = "old-key-1234,new-key-5678"


@pytest.fixture(scope="module")
async def keyed(tiny_models_file: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(tiny_models_file, api_keys=KEYS, cors_origins="https://app.example") as c:
        yield c


async def classify(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.post(
        "/v1/classify", content=jpeg(), headers={"Content-Type": "image/jpeg", **headers}
    )


# -- the key check --------------------------------------------------------------------------------


def test_key_ring_accepts_each_key_and_nothing_else() -> None:
    ring = KeyRing(["alpha", "beta-long-key"])
    assert ring.accepts(b"alpha") and ring.accepts(b"beta-long-key")
    for wrong in (b"", b"alph", b"alphaa", b"ALPHA", b"beta", b"alpha beta-long-key"):
        assert not ring.accepts(wrong), wrong
    with pytest.raises(ValueError):
        KeyRing([])


@pytest.mark.parametrize("presented", [b"k0", b"k2", b"nope"])
def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch, presented: bytes) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        assert len(a) == len(b) == 32  # digests: the keys' lengths do not show
        return real(a, b)

    monkeypatch.setattr("app.auth.hmac.compare_digest", counting)
    ring = KeyRing(["k0", "k1", "k2"])
    ring.accepts(presented)
    assert len(calls) == 3  # no early exit on the first match


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer abc")], b"abc"),
        ([(b"authorization", b"bearer   abc ")], b"abc"),
        ([(b"x-api-key", b"xyz")], b"xyz"),
        ([(b"authorization", b"Basic dXNlcjpwdw=="), (b"x-api-key", b"xyz")], b"xyz"),
        ([(b"authorization", b"Bearer abc"), (b"x-api-key", b"xyz")], b"abc"),
        ([(b"authorization", b"Basic dXNlcjpwdw==")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([], None),
    ],
)
def test_presented_key(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert presented_key(headers) == expected


# -- over HTTP ------------------------------------------------------------------------------------


async def test_requests_without_a_valid_key_get_401(keyed: httpx.AsyncClient) -> None:
    missing = await classify(keyed, {"X-Request-ID": "no-key"})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.headers["X-Request-ID"] == "no-key"
    body = missing.json()
    assert body["code"] == "UNAUTHORIZED" and body["request_id"] == "no-key" and "API key" in body["error"]
    wrong = await classify(keyed, {"Authorization": "Bearer old-key-123"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid API key"
    basic = await classify(keyed, {"Authorization": "Basic b2xkLWtleS0xMjM0Og=="})
    assert basic.status_code == 401
    for path in ("/v1/models", f"/v1/models/{CLASSIFIER}", f"/v2/models/{CLASSIFIER}", "/v2"):
        assert (await keyed.get(path)).status_code == 401, path


async def test_either_key_and_either_header_are_accepted(keyed: httpx.AsyncClient) -> None:
    # rotation: the old and the new key work side by side
    for headers in (
        {"Authorization": "Bearer old-key-1234"},
        {"Authorization": "bearer new-key-5678"},
        {"X-API-Key": "new-key-5678"},
    ):
        response = await classify(keyed, headers)
        assert response.status_code == 200, (headers, response.text)
    v2 = await keyed.get(f"/v2/models/{CLASSIFIER}", headers={"X-API-Key": "old-key-1234"})
    assert v2.status_code == 200


async def test_health_and_metrics_stay_open_and_401s_are_counted(keyed: httpx.AsyncClient) -> None:
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics", "/docs"):
        assert (await keyed.get(path)).status_code == 200, path
    assert (await keyed.head("/health/ready")).status_code == 200
    await classify(keyed, {})
    metrics = (await keyed.get("/metrics")).text
    assert 'vision_rejects_total{reason="UNAUTHORIZED"}' in metrics
    assert 'status="401"' in metrics


async def test_the_page_loads_without_a_key_but_its_api_calls_need_one(
    tiny_models_file: Path, keyed: httpx.AsyncClient
) -> None:
    for path in ("/", "/ui/app.js", "/ui/app.css"):
        assert (await keyed.get(path)).status_code == 200, path
    unkeyed = await keyed.post("/v1/detect", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert unkeyed.status_code == 401
    assert (await keyed.get("/ui/nothing-here.js")).status_code == 401  # only the shipped files are open
    async with serve(tiny_models_file, api_keys="k-123", ui_enabled=False) as c:
        assert (await c.get("/")).status_code == 401  # no page: nothing to open


async def test_metrics_can_require_the_key(tiny_models_file: Path) -> None:
    async with serve(tiny_models_file, api_keys="k-123", metrics_public=False, docs_enabled=False) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"X-API-Key": "k-123"})).status_code == 200
        assert (await c.get("/health/ready")).status_code == 200
        # docs switched off: gone, key or not
        assert (await c.get("/docs", headers={"X-API-Key": "k-123"})).status_code == 404
        assert (await c.get("/openapi.json", headers={"X-API-Key": "k-123"})).status_code == 404


async def test_no_keys_means_no_check(client: httpx.AsyncClient) -> None:
    assert (await classify(client, {})).status_code == 200


# -- CORS -----------------------------------------------------------------------------------------


async def test_cors_preflight_passes_without_a_key(keyed: httpx.AsyncClient) -> None:
    preflight = await keyed.options(
        "/v1/classify",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-request-timeout-ms",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-api-key" in allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]


async def test_cors_headers_on_answers_and_on_401(keyed: httpx.AsyncClient) -> None:
    origin = {"Origin": "https://app.example"}
    ok = await classify(keyed, {**origin, "X-API-Key": "old-key-1234"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    refused = await classify(keyed, origin)
    assert refused.status_code == 401  # the browser can read why
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    stranger = await classify(keyed, {"Origin": "https://evil.example", "X-API-Key": "old-key-1234"})
    assert "access-control-allow-origin" not in stranger.headers


async def test_no_cors_headers_unless_configured(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/live", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


# -- nothing a client sends reaches a path or a URL -----------------------------------------------

MARKER = "zq7-client-marker"

#: Audit events (PEP 578) through which a string could reach the filesystem, the network or a process.
_SENSITIVE_EVENTS = (
    "open",
    "os.",
    "shutil.",
    "glob.",
    "socket.",
    "urllib.",
    "http.client.",
    "subprocess.",
    "ftplib.",
    "webbrowser.",
    "ctypes.dlopen",
    "import",
    "torch.",
)
_audit: dict[str, Any] = {"on": False, "seen": []}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _audit["on"] or not event.startswith(_SENSITIVE_EVENTS):
        return
    try:
        text = repr(args)
    except Exception:  # an object whose repr fails cannot carry the marker as text
        return
    if MARKER in text or MARKER.encode().hex() in text:
        _audit["seen"].append((event, text[:200]))


sys.addaudithook(_hook)  # hooks cannot be removed; it does nothing while _audit["on"] is False


def test_the_audit_hook_sees_paths_and_urls(tmp_path: Path) -> None:
    # the test below means something only if the hook catches these
    _audit["seen"] = []
    _audit["on"] = True
    try:
        with contextlib.suppress(OSError):
            open(tmp_path / MARKER).close()
        with contextlib.suppress(OSError):
            os.listdir(tmp_path / MARKER)
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"file:///nonexistent/{MARKER}")
    finally:
        _audit["on"] = False
    assert {event for event, _ in _audit["seen"]} >= {"open", "os.listdir", "urllib.Request"}


async def test_client_input_never_reaches_a_path_or_url(client: httpx.AsyncClient) -> None:
    hostile_names = [
        MARKER,
        f"../../{MARKER}",
        f"..%2F..%2F{MARKER}",
        f"/etc/{MARKER}",
        f"http://{MARKER}.example/m.pth",
        f"file:///{MARKER}",
    ]
    url_images = [f"http://{MARKER}.example/a.jpg", f"file:///tmp/{MARKER}.jpg", f"/tmp/{MARKER}.jpg"]
    _audit["seen"] = []
    _audit["on"] = True
    try:
        statuses: list[int] = []
        for name in hostile_names:
            for response in (
                await client.get(f"/v1/models/{name}"),
                await client.post(
                    f"/v1/models/{name}/predict", content=jpeg(), headers={"Content-Type": "image/jpeg"}
                ),
                await client.post("/v1/classify", params={"model": name}, files={"file": (name, jpeg())}),
                await client.get(f"/v2/models/{name}"),
                await client.post(f"/v2/models/{name}/infer", json={"inputs": []}),
            ):
                statuses.append(response.status_code)
        for text in url_images:
            statuses.append((await client.post("/v1/classify", json={"image": text})).status_code)
            statuses.append((await client.post("/v1/detect", json={"images": [text]})).status_code)
            statuses.append(
                (
                    await client.post(
                        "/v1/classify", content=text.encode(), headers={"Content-Type": "image/jpeg"}
                    )
                ).status_code
            )
            encoded = base64.b64encode(text.encode()).decode()
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
            statuses.append((await client.post(f"/v2/models/{CLASSIFIER}/infer", json=body)).status_code)
        headered = await client.post(
            "/v1/classify",
            content=jpeg(),
            headers={"Content-Type": "image/jpeg", "X-Request-ID": MARKER, "Referer": f"http://{MARKER}/"},
        )
        statuses.append(headered.status_code)
    finally:
        _audit["on"] = False
    assert _audit["seen"] == [], _audit["seen"]
    # and none of it was served: unknown names are 404, URLs are not images
    assert set(statuses) <= {200, 400, 404, 422}, statuses
    assert statuses.count(200) == 1  # only the real image with a hostile request id
