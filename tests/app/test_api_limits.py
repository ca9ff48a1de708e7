"""Limits and error answers over ASGI: body size, file count, pixels, bad images, media types,
overload, deadlines and internal errors. Every one is the contract's JSON with a request id."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import app.routers.predict as predict_module
from app.main import create_app
from models import Classifier
from tests.app.harness import running, serve, settings_for
from tests.app.helpers import encode, jpeg, photo, png, png_header_only

MiB = 1024 * 1024


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code", "request_id"}
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in body["error"]
    return body


# -- bytes ----------------------------------------------------------------------------------------


async def test_body_over_the_default_limit_with_content_length(client: httpx.AsyncClient) -> None:
    data = b"\xff" * (20 * MiB + 1)
    response = await client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


async def test_content_length_is_refused_before_reading(client: httpx.AsyncClient) -> None:
    """Call the ASGI app directly: the body must never be asked for."""
    app = client._transport.app  # type: ignore[attr-defined]
    received: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append("body")
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"image/png"),
            (b"content-length", b"999999999999"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert received == []


async def test_streamed_body_without_length_stops_at_the_limit(classifier_models_file: Path) -> None:
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):  # 100 x 4 KiB = 400 KiB, the limit is 32 KiB
            pulled += 1
            yield b"\x00" * 4096

    async with serve(classifier_models_file, max_body_bytes=32 * 1024, max_batch_size=1) as client:
        response = await client.post("/v1/classify", content=chunks(), headers={"Content-Type": "image/png"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")
        assert pulled < 20  # reading stopped soon after the limit
        small = await client.post("/v1/classify", content=png(), headers={"Content-Type": "image/png"})
        assert small.status_code == 200


async def test_too_many_files(client: httpx.AsyncClient) -> None:
    data = png(8, 8)
    files = [("file", (f"{i}.png", data)) for i in range(33)]
    assert_error(await client.post("/v1/classify", files=files), 413, "TOO_MANY_FILES")
    ok = await client.post("/v1/classify", files=files[:32], params={"top_k": 1})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 32
    images = [base64.b64encode(data).decode()] * 33
    assert_error(await client.post("/v1/classify", json={"images": images}), 413, "TOO_MANY_FILES")


# -- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "INVALID_IMAGE"),
        (b"just some text, not a picture\n" * 10, 400, "INVALID_IMAGE"),
        (np.random.default_rng(0).bytes(5000), 400, "INVALID_IMAGE"),
        (jpeg(128, 96)[:900], 400, "INVALID_IMAGE"),
        (png(128, 96)[:300], 400, "INVALID_IMAGE"),
        (png_header_only(30000, 30000), 413, "IMAGE_TOO_LARGE"),
        (png_header_only(8000, 6000), 413, "IMAGE_TOO_LARGE"),
        (encode(photo(16, 16), "ICO"), 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
    ids=["empty", "text", "random", "truncated-jpeg", "truncated-png", "bomb-30000", "48MP", "ico"],
)
async def test_bad_images(client: httpx.AsyncClient, data: bytes, status: int, code: str) -> None:
    as_file = await client.post("/v1/detect", files={"file": ("x.png", data, "image/png")})
    assert_error(as_file, status, code)
    raw = await client.post("/v1/classify", content=data, headers={"Content-Type": "image/png"})
    assert_error(raw, status, code)
    # the service is still fine afterwards
    assert (await client.post("/v1/classify", files={"file": ("ok.png", png())})).status_code == 200


async def test_elongated_strip_is_served_without_upscaling_it_whole(client: httpx.AsyncClient) -> None:
    strip = png(4000, 1)  # ~100 bytes; resized whole to 224 px high it would be 896000 px wide
    assert len(strip) < 1000
    response = await client.post("/v1/classify", files={"file": ("s.png", strip)})
    assert response.status_code == 200
    assert response.json()["results"][0]["image"] == {"width": 4000, "height": 1}
    assert (await client.post("/v1/detect", files={"file": ("s.png", strip)})).status_code == 200


async def test_the_failing_image_of_several_is_named(client: httpx.AsyncClient) -> None:
    files = [("file", ("a.png", png())), ("file", ("b.png", b"")), ("file", ("c.png", b"nope"))]
    body = assert_error(await client.post("/v1/classify", files=files), 400, "INVALID_IMAGE")
    assert body["error"].startswith("image 1:")


# -- request forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "image/svg+xml", None]
)
async def test_unsupported_content_types(client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/v1/classify", content=png(), headers=headers)
    body = assert_error(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert "multipart/form-data" in body["error"]  # says what to send


async def test_malformed_multipart(client: httpx.AsyncClient) -> None:
    boundary = "XyZ"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()
    unfinished = head + png()  # no closing boundary
    response = await client.post(
        "/v1/classify",
        content=unfinished,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(response, 422, "VALIDATION_ERROR")
    no_boundary = await client.post(
        "/v1/classify", content=b"x", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(no_boundary, 422, "VALIDATION_ERROR")
    no_file = await client.post("/v1/classify", files={"image": ("a.png", png())})
    assert "'file'" in assert_error(no_file, 422, "VALIDATION_ERROR")["error"]


# -- overload, deadlines, internal errors ---------------------------------------------------------


class Gate:
    """``open`` lets Classifier.predict run; ``entered`` is set once a batch waits at the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

    def set(self) -> None:
        self.open.set()

    def clear(self) -> None:
        self.open.clear()
        self.entered.clear()


@pytest.fixture
def gated_classifier(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Classifier.predict waits at the returned gate (set it to let batches through)."""
    gate = Gate()
    real = Classifier.predict

    def gated(self: Classifier, batch: Any, top_k: Any = 5) -> Any:
        gate.entered.set()
        gate.open.wait(timeout=30)
        return real(self, batch, top_k)

    monkeypatch.setattr(Classifier, "predict", gated)
    yield gate
    gate.set()


async def test_overload_is_503_with_retry_after(classifier_models_file: Path, gated_classifier: Gate) -> None:
    app = create_app(
        settings_for(
            max_batch_size=1,
            max_queue_images=2,
            max_files=2,
            max_delay_ms=0,
            models_file=classifier_models_file,
        )
    )
    gated_classifier.set()  # let the warm-up pass
    async with running(app) as client:
        gated_classifier.clear()
        first = asyncio.ensure_future(client.post("/v1/classify", files={"file": ("a", png())}))
        await asyncio.to_thread(gated_classifier.entered.wait, 30)  # in the model thread, at the gate
        queued = asyncio.ensure_future(client.post("/v1/classify", files=[("file", ("b", png()))] * 2))
        for _ in range(100):  # until both of its images are queued
            if app.state.service.registry.models["vgg16-tiny"].batcher.queued == 2:
                break
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/classify", files={"file": ("c", png())})
        body = assert_error(refused, 503, "OVERLOADED")
        assert refused.headers["retry-after"] == "1" and "vgg16-tiny" in body["error"]
        gated_classifier.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'vision_rejects_total{reason="OVERLOADED"} 1.0' in metrics  # one refused request


async def test_concurrent_requests_share_a_forward_pass(
    classifier_models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    sizes: list[int] = []
    real = Classifier.predict

    entered = threading.Event()

    def recording(self: Classifier, batch: Any, top_k: Any = 5) -> Any:
        entered.set()
        gate.wait(timeout=30)
        sizes.append(int(batch.shape[0]))
        return real(self, batch, top_k)

    app = create_app(settings_for(max_batch_size=4, max_delay_ms=0, models_file=classifier_models_file))
    gate.set()
    async with running(app) as client:
        monkeypatch.setattr(Classifier, "predict", recording)
        gate.clear()
        batcher = app.state.service.registry.models["vgg16-tiny"].batcher
        first = asyncio.ensure_future(client.post("/v1/classify", files={"file": ("a", png())}))
        await asyncio.to_thread(entered.wait, 30)  # the first batch is now held in the model thread
        others = [
            asyncio.ensure_future(client.post("/v1/classify", files={"file": (str(i), png(seed=i))}))
            for i in range(4)
        ]
        for _ in range(500):
            if batcher.queued == 4:
                break
            await asyncio.sleep(0.01)
        gate.set()
        answers = await asyncio.gather(first, *others)
    assert [r.status_code for r in answers] == [200] * 5
    assert sizes == [1, 4]  # the four waiting requests went through one forward pass


async def test_deadline_exceeded_is_504(classifier_models_file: Path, gated_classifier: Gate) -> None:
    gated_classifier.set()
    app = create_app(settings_for(max_batch_size=1, max_delay_ms=0, models_file=classifier_models_file))
    async with running(app) as client:
        gated_classifier.clear()
        slow = asyncio.ensure_future(client.post("/v1/classify", files={"file": ("a", png())}))
        await asyncio.to_thread(gated_classifier.entered.wait, 30)
        late = await client.post(
            "/v1/classify", files={"file": ("b", png())}, headers={"X-Request-Timeout-Ms": "50"}
        )
        assert_error(late, 504, "DEADLINE_EXCEEDED")
        gated_classifier.set()
        assert (await slow).status_code == 200
        for value in ("soon", "0", "-5"):
            bad = await client.post(
                "/v1/classify", files={"file": ("b", png())}, headers={"X-Request-Timeout-Ms": value}
            )
            assert "X-Request-Timeout-Ms" in assert_error(bad, 422, "VALIDATION_ERROR")["error"]
        fine = await client.post(
            "/v1/classify", files={"file": ("b", png())}, headers={"X-Request-Timeout-Ms": "99999999"}
        )
        assert fine.status_code == 200  # capped at the configured deadline, not refused
        metrics = (await client.get("/metrics")).text
        assert 'vision_rejects_total{reason="DEADLINE_EXCEEDED"} 1.0' in metrics  # once, not per stage


async def test_exception_in_predict_is_500_and_the_next_request_works(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Classifier.predict
    calls = {"n": 0}

    def flaky(self: Classifier, batch: Any, top_k: Any = 5) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access (secret detail)")
        return real(self, batch, top_k)

    monkeypatch.setattr(Classifier, "predict", flaky)
    failed = await client.post("/v1/classify", files={"file": ("a", png())})
    body = assert_error(failed, 500, "INTERNAL")
    assert "secret" not in body["error"]
    assert (await client.post("/v1/classify", files={"file": ("a", png())})).status_code == 200


async def test_unexpected_exception_in_a_handler_is_500_json(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("internal detail")

    monkeypatch.setattr(predict_module, "classify_body", broken)
    response = await client.post(
        "/v1/classify", files={"file": ("a", png())}, headers={"X-Request-ID": "boom-1"}
    )
    body = assert_error(response, 500, "INTERNAL")
    assert body["request_id"] == "boom-1" and "internal detail" not in body["error"]
