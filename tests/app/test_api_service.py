"""Health, models listing, docs, metrics, request ids, route errors and the startup states, over ASGI."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from app import inference
from app.batching import ItemFailure
from app.errors import ApiError
from app.images import Batch, ImageDecoder, PreparedImage
from app.main import create_app
from app.metrics import Metrics
from bench.breakdown import timing_totals
from models import Classifier, Predictor
from tests.app.harness import CLASSIFIER, DETECTOR, VOC_DETECTOR, running, serve, settings_for, wait_ready
from tests.app.helpers import png

CONTRACT_FIELDS = {
    "name",
    "task",
    "arch",
    "format",
    "num_classes",
    "device",
    "dtype",
    "input_size",
    "default",
    "sha256",
}


async def test_live_and_ready(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    ready = await client.get("/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    for path in ("/health/live", "/health/ready"):  # load balancers that probe with HEAD
        assert (await client.head(path)).status_code == 200


async def test_models_list(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = response.json()["models"]
    assert [m["name"] for m in models] == [CLASSIFIER, DETECTOR, VOC_DETECTOR]  # the file's order
    by_name = {m["name"]: m for m in models}
    for m in models:
        assert set(m) >= CONTRACT_FIELDS
        assert (m["device"], m["dtype"]) == ("cpu", "float32")
        assert re.fullmatch(r"[0-9a-f]{64}", m["sha256"])
        # torch at fp32: the networks as loaded, so no agreement check ran
        assert (m["runtime"], m["agreement"]) == ("torch", None)
    assert by_name[CLASSIFIER]["input_size"] == {"width": 224, "height": 224}
    assert by_name[DETECTOR]["input_size"] == {"width": 300, "height": 300}
    assert (by_name[CLASSIFIER]["task"], by_name[CLASSIFIER]["arch"], by_name[CLASSIFIER]["format"]) == (
        "classify",
        "vgg16",
        "torchvision",
    )
    assert by_name[VOC_DETECTOR]["format"] == "ssd.pytorch" and by_name[VOC_DETECTOR]["num_classes"] == 20
    # the only classifier is the default although unmarked; the marked detector is the default
    assert [m["name"] for m in models if m["default"]] == [CLASSIFIER, DETECTOR]


async def test_model_detail(client: httpx.AsyncClient, predictor_by_name: dict[str, Predictor]) -> None:
    response = await client.get(f"/v1/models/{VOC_DETECTOR}")
    assert response.status_code == 200
    body = response.json()
    assert CONTRACT_FIELDS | {"labels"} <= set(body)
    assert body["labels"] == predictor_by_name[VOC_DETECTOR].info.labels
    assert len(body["labels"]) == body["num_classes"]
    assert body["defaults"]["score_threshold"] == 0.6
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"


async def test_request_id_echoed_generated_and_sanitised(client: httpx.AsyncClient) -> None:
    mine = await client.get("/health/live", headers={"X-Request-ID": "abc-123 from client"})
    assert mine.headers["x-request-id"] == "abc-123 from client"
    fresh = await client.get("/health/live")
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    too_long = await client.get("/health/live", headers={"X-Request-ID": "x" * 129})
    assert too_long.headers["x-request-id"] != "x" * 129
    control = await client.get("/health/live", headers={"X-Request-ID": "bad\tid"})
    assert re.fullmatch(r"[0-9a-f]{32}", control.headers["x-request-id"])
    error = await client.post("/v1/classify", headers={"X-Request-ID": "err-1", "Content-Type": "text/plain"})
    assert error.headers["x-request-id"] == "err-1" and error.json()["request_id"] == "err-1"


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope", headers={"X-Request-ID": "r404"})
    assert missing.status_code == 404
    assert missing.json() == {"error": "no route /nope", "code": "NOT_FOUND", "request_id": "r404"}
    wrong = await client.get("/v1/classify")
    assert wrong.status_code == 405
    assert (
        wrong.json()["code"] == "METHOD_NOT_ALLOWED"
        and wrong.json()["request_id"] == wrong.headers["x-request-id"]
    )
    assert "POST" in wrong.headers["allow"]


async def test_docs_are_served(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/classify", "/v1/detect", "/v1/models/{name}/predict", "/health/ready"} <= set(
        schema["paths"]
    )
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)


async def test_docs_can_be_switched_off(classifier_models_file: Path) -> None:
    async with serve(classifier_models_file, docs_enabled=False, max_batch_size=1) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            response = await client.get(path)
            assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
        assert (await client.get("/health/ready")).status_code == 200


async def test_metrics_after_requests(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v1/classify", files=[("file", ("a", png())), ("file", ("b", png()))])
    assert ok.status_code == 200
    bad = await client.post("/v1/detect", content=b"", headers={"Content-Type": "image/png"})
    assert bad.status_code == 400
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert f'vision_requests_total{{endpoint="/v1/classify",model="{CLASSIFIER}",status="200"}}' in text
    assert f'vision_requests_total{{endpoint="/v1/detect",model="{DETECTOR}",status="400"}}' in text
    assert (
        f'vision_request_duration_seconds_bucket{{endpoint="/v1/classify",le="+Inf",model="{CLASSIFIER}",status="200"}}'
        in text
    )
    assert f'vision_inference_seconds_count{{model="{CLASSIFIER}"}}' in text
    assert f'vision_images_per_request_bucket{{le="2.0",model="{CLASSIFIER}"}}' in text
    assert f'vision_batch_size_count{{model="{CLASSIFIER}"}}' in text
    assert f'vision_queue_depth_images{{model="{CLASSIFIER}"}} 0.0' in text
    assert f'vision_queue_wait_seconds_count{{model="{CLASSIFIER}"}}' in text
    assert 'vision_rejects_total{reason="INVALID_IMAGE"}' in text
    assert f'vision_model_ready{{model="{CLASSIFIER}"}} 1.0' in text
    assert f'vision_model_warmup_seconds{{model="{CLASSIFIER}"}}' in text


async def test_metrics_report_device_memory_per_batch(
    tiny_models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the warm-up and after each batch the worker publishes models.device_memory's
    readings (a GPU's allocator bytes; None on the CPU, which leaves the metric without series)."""
    calls: list[str] = []

    def fake(device: torch.device) -> dict[str, int] | None:
        calls.append(str(device))
        return {"allocated": 10 * len(calls), "reserved": 20 * len(calls), "peak_reserved": 30}

    async with serve(tiny_models_file, max_batch_size=1) as cpu_only:
        text = (await cpu_only.get("/metrics")).text
        assert "# TYPE vision_device_memory_bytes gauge" in text
        assert "vision_device_memory_bytes{" not in text  # CPU: no readings, no series
    monkeypatch.setattr(inference, "device_memory", fake)
    async with serve(tiny_models_file, max_batch_size=1) as client:
        warmed = len(calls)
        assert warmed == 3  # one reading per model after its warm-up
        assert (await client.post("/v1/classify", files={"file": ("a", png())})).status_code == 200
        assert len(calls) == warmed + 1  # and one per batch
        text = (await client.get("/metrics")).text
        n = len(calls)
        assert f'vision_device_memory_bytes{{device="cpu",kind="reserved"}} {20.0 * n}' in text
        assert f'vision_device_memory_bytes{{device="cpu",kind="allocated"}} {10.0 * n}' in text
        assert 'vision_device_memory_bytes{device="cpu",kind="peak_reserved"} 30.0' in text


def stage_series(text: str, model: str) -> dict[str, tuple[float, float]]:
    """(count, sum) of each stage of ``vision_stage_seconds`` for ``model`` in a /metrics text."""
    totals = timing_totals(text, model)
    stages = {key.removeprefix("stage_").rsplit("_", 1)[0] for key in totals if key.startswith("stage_")}
    return {stage: (totals[f"stage_{stage}_count"], totals[f"stage_{stage}_sum"]) for stage in stages}


async def test_metrics_time_each_stage_of_a_request(tiny_models_file: Path) -> None:
    """vision_stage_seconds: decode once per request; stack and run once per batch, together no
    longer than the batch the batcher timed; a batch whose every image failed has no run."""
    async with serve(tiny_models_file, max_batch_size=1) as client:
        two = [("file", ("a", png())), ("file", ("b", png()))]
        assert (await client.post("/v1/classify", files=two)).status_code == 200
        assert (await client.post("/v1/classify", files={"file": ("c", png())})).status_code == 200
        text = (await client.get("/metrics")).text
    stages = stage_series(text, CLASSIFIER)
    assert set(stages) == {"decode", "stack", "run"}
    assert stages["decode"][0] == 2  # two requests
    assert stages["stack"][0] == stages["run"][0] == 3  # three images, batches of one
    assert all(total > 0 for _, total in stages.values())
    batches = re.search(rf'vision_inference_seconds_sum{{model="{CLASSIFIER}"}} (\S+)', text)
    assert batches is not None
    assert stages["stack"][1] + stages["run"][1] <= float(batches.group(1))


def test_a_batch_without_a_readable_image_has_no_run_time(predictor_by_name: dict[str, Predictor]) -> None:
    predictor = predictor_by_name[CLASSIFIER]
    failure = ApiError(400, "INVALID_IMAGE", "not an image")

    class Unreadable(ImageDecoder):
        def stack(self, predictor: Predictor, images: Sequence[PreparedImage]) -> Batch:
            return Batch(None, dict.fromkeys(range(len(images)), failure))

    metrics = Metrics()
    run = inference.batch_runner(predictor, Unreadable(ThreadPoolExecutor(1), 10**6), metrics)
    item = inference.ImageItem(PreparedImage((4, 4)), predictor.default_options)
    outputs = run([item, item])
    assert [type(out) for out in outputs] == [ItemFailure, ItemFailure]
    stages = stage_series(metrics.render().decode(), CLASSIFIER)
    assert stages["stack"][0] == 1 and "run" not in stages


async def test_startup_loads_the_models_file_and_records_load_time(tiny_models_file: Path) -> None:
    app = create_app(settings_for(models_file=tiny_models_file, max_batch_size=1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        async with app.router.lifespan_context(app):
            await wait_ready(client)
            models = (await client.get("/v1/models")).json()["models"]
            assert [m["name"] for m in models] == [CLASSIFIER, DETECTOR, VOC_DETECTOR]
            assert [m["default"] for m in models] == [True, True, False]
            metrics = (await client.get("/metrics")).text
            for name in (CLASSIFIER, DETECTOR, VOC_DETECTOR):
                assert f'vision_model_load_seconds{{model="{name}"}}' in metrics
            assert (await client.post("/v1/classify", files={"file": ("a", png())})).status_code == 200
        # after the lifespan ended: draining
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and "draining" in ready.json()["reason"]
        refused = await client.post("/v1/classify", files={"file": ("a", png())})
        assert refused.status_code == 503 and refused.json()["code"] == "DRAINING"
        assert refused.headers["retry-after"]


async def test_bad_models_file_keeps_the_app_not_ready_and_reports(tmp_path: Path) -> None:
    bad = tmp_path / "models.toml"
    bad.write_text(
        '[[models]]\nname = "x"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "none.pth"\n'
    )
    app = create_app(settings_for(models_file=bad))
    async with running(app, ready=False) as client:
        for _ in range(200):
            if app.state.service.failure:
                break
            await asyncio.sleep(0.02)
        assert "none.pth" in app.state.service.failure  # python -m app exits 1 with it
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and "startup failed" in ready.json()["reason"]
        assert "none.pth" in ready.json()["reason"]
        assert (await client.get("/health/live")).status_code == 200
        listing = await client.get("/v1/models")
        assert listing.status_code == 503 and listing.json()["code"] == "NOT_READY"


async def test_not_ready_until_warm_up_finished(
    classifier_models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_warmup = Classifier.warmup

    def slow_warmup(self: Classifier, batch_sizes: object = (1,)) -> None:
        gate.wait(timeout=30)
        real_warmup(self, batch_sizes)  # type: ignore[arg-type]

    monkeypatch.setattr(Classifier, "warmup", slow_warmup)
    app = create_app(settings_for(max_batch_size=1, models_file=classifier_models_file))
    try:
        async with running(app, ready=False) as client:
            # The models are handed over in a background task: "starting", then "warming up"
            # (held there by the gate); never ready in between.
            for _ in range(500):
                ready = await client.get("/health/ready")
                assert ready.status_code == 503 and ready.headers["retry-after"]
                assert ready.json()["status"] == "not_ready"
                if "warming up" in ready.json()["reason"]:
                    break
                await asyncio.sleep(0.01)
            assert "warming up" in ready.json()["reason"]
            assert (await client.get("/health/live")).status_code == 200
            early = await client.post("/v1/classify", files={"file": ("a", png())})
            assert (
                early.status_code == 503
                and early.json()["code"] == "NOT_READY"
                and early.headers["retry-after"]
            )
            models = (await client.get("/v1/models")).json()["models"]
            assert models[0]["ready"] is False
            gate.set()
            for _ in range(500):
                if (await client.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            assert (await client.post("/v1/classify", files={"file": ("a", png())})).status_code == 200
    finally:
        gate.set()


async def test_admission_starts_with_the_pace_of_a_warm_full_batch(
    classifier_models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []
    real_warmup = Classifier.warmup

    def recorded(self: Classifier, batch_sizes: Iterable[int] = (1,)) -> None:
        calls.append(list(batch_sizes))
        if calls[-1] == [3] and len(calls) > 1:  # the timed batch: make its pace unmistakable
            time.sleep(0.3)
        real_warmup(self, calls[-1])

    monkeypatch.setattr(Classifier, "warmup", recorded)
    app = create_app(settings_for(max_batch_size=3, models_file=classifier_models_file))
    async with running(app):
        batcher = app.state.service.registry.models[CLASSIFIER].batcher
        expected = batcher.expected_seconds(6)  # known before any request was batched
    assert calls == [[1, 2, 3], [3]]  # every size once, then one timed full batch
    assert expected is not None and 0.6 <= expected < 1.5  # two batches of at least 0.3 s


async def test_warm_up_failure_is_reported(
    classifier_models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Classifier, batch_sizes: object = (1,)) -> None:
        raise RuntimeError("no memory left on the device")

    monkeypatch.setattr(Classifier, "warmup", broken)
    app = create_app(settings_for(max_batch_size=1, models_file=classifier_models_file))
    async with running(app, ready=False) as client:
        for _ in range(200):
            if app.state.service.failure:
                break
            await asyncio.sleep(0.02)
        assert "no memory" in app.state.service.failure
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and "no memory" in ready.json()["reason"]
