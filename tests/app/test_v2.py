"""The Open Inference Protocol (KServe v2) subset: health, metadata, readiness, infer (JSON and the
binary tensor extension) checked against the v1 answers for the same images, the v2 errors; and
``tritonclient.http``, a standard v2 client, against a real uvicorn on loopback."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from app.main import create_app
from tests.app.harness import CLASSIFIER, DETECTOR, VOC_DETECTOR, running, serve, settings_for
from tests.app.helpers import encode, jpeg, png
from tests.app.test_server_process import free_port

IMAGES = [jpeg(64, 48, seed=0), png(40, 70, seed=1), jpeg(120, 90, seed=2)]
#: Images on which the tiny VOC detector finds different numbers of boxes at DETECT_PARAMS.
UNEVEN = [*IMAGES[:2], encode(Image.new("RGB", (50, 50), (255, 255, 255)), "PNG")]
DETECT_PARAMS = {"score_threshold": 0.3, "max_detections": 100}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_json(images: list[bytes], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": [b64(i) for i in images]}
        ]
    }
    body.update(extra)
    return body


def binary_request(
    images: list[bytes], document: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension, built here from the spec (length-prefixed BYTES)."""
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    doc = document or {}
    doc.setdefault(
        "inputs",
        [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(images)],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    )
    head = json.dumps(doc).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


async def v1_results(client: httpx.AsyncClient, path: str, images: list[bytes], **params: Any) -> list[Any]:
    response = await client.post(path, params=params, files=[("file", ("x", i)) for i in images])
    assert response.status_code == 200, response.text
    results: list[Any] = response.json()["results"]
    return results


# -- health and metadata ------------------------------------------------------------------------


async def test_health_and_server_metadata(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    ready = await client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "vision-serve" and "binary_tensor_data" in meta["extensions"]


async def test_model_metadata_describes_the_tensors(client: httpx.AsyncClient) -> None:
    classifier = (await client.get(f"/v2/models/{CLASSIFIER}")).json()
    assert classifier["name"] == CLASSIFIER and classifier["versions"] == ["1"] and classifier["platform"]
    assert classifier["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in classifier["outputs"]} == {
        "scores": "FP32",
        "class_ids": "INT64",
        "labels": "BYTES",
        "image_size": "INT32",
    }
    detector = (await client.get(f"/v2/models/{DETECTOR}/versions/1")).json()
    shapes = {o["name"]: o["shape"] for o in detector["outputs"]}
    assert shapes["boxes"] == [-1, -1, 4] and shapes["num_detections"] == [-1]


async def test_model_ready_and_unknown_models_or_versions(client: httpx.AsyncClient) -> None:
    ready = await client.get(f"/v2/models/{VOC_DETECTOR}/ready")
    assert ready.status_code == 200 and ready.json() == {"name": VOC_DETECTOR, "ready": True}
    assert (await client.get(f"/v2/models/{CLASSIFIER}/versions/1/ready")).status_code == 200
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{CLASSIFIER}/versions/2"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["code"] == "MODEL_NOT_FOUND" and "error" in response.json()
    missing = await client.post("/v2/models/nope/infer", json=infer_json(IMAGES[:1]))
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


# -- inference ----------------------------------------------------------------------------------


async def test_classify_tensors_equal_the_v1_answers(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"/v2/models/{CLASSIFIER}/infer", json=infer_json(IMAGES, id="req-7", parameters={"top_k": 3})
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == CLASSIFIER and body["model_version"] == "1" and body["id"] == "req-7"
    out = outputs_by_name(body)
    assert out["scores"]["shape"] == [3, 3] and out["scores"]["datatype"] == "FP32"
    scores = np.array(out["scores"]["data"]).reshape(3, 3)
    ids = np.array(out["class_ids"]["data"]).reshape(3, 3)
    labels = np.array(out["labels"]["data"]).reshape(3, 3)
    v1 = await v1_results(client, "/v1/classify", IMAGES, top_k=3, model=CLASSIFIER)
    for row, result in enumerate(v1):
        assert ids[row].tolist() == [p["class_id"] for p in result["predictions"]]
        assert labels[row].tolist() == [p["label"] for p in result["predictions"]]
        assert scores[row] == pytest.approx([p["score"] for p in result["predictions"]], abs=1e-6)
        size = out["image_size"]["data"][2 * row : 2 * row + 2]
        assert size == [result["image"]["width"], result["image"]["height"]]


async def test_detect_tensors_equal_the_v1_answers_with_padding(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"/v2/models/{VOC_DETECTOR}/infer", json=infer_json(UNEVEN, parameters=DETECT_PARAMS)
    )
    assert response.status_code == 200, response.text
    out = outputs_by_name(response.json())
    v1 = await v1_results(client, "/v1/detect", UNEVEN, model=VOC_DETECTOR, **DETECT_PARAMS)
    counts = [len(r["detections"]) for r in v1]
    assert len(set(counts)) > 1, counts  # else the padding below is not exercised
    width = max(counts)
    assert out["num_detections"]["data"] == counts and out["num_detections"]["datatype"] == "INT32"
    assert out["boxes"]["shape"] == [3, width, 4] and out["scores"]["shape"] == [3, width]
    boxes = np.array(out["boxes"]["data"], dtype=np.float64).reshape(3, width, 4)
    scores = np.array(out["scores"]["data"]).reshape(3, width)
    ids = np.array(out["class_ids"]["data"]).reshape(3, width)
    labels = np.array(out["labels"]["data"]).reshape(3, width)
    for row, result in enumerate(v1):
        n = counts[row]
        expected = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in result["detections"]]
        assert boxes[row, :n] == pytest.approx(np.array(expected).reshape(n, 4), abs=1e-3)
        assert ids[row, :n].tolist() == [d["class_id"] for d in result["detections"]]
        assert labels[row, :n].tolist() == [d["label"] for d in result["detections"]]
        assert scores[row, :n] == pytest.approx([d["score"] for d in result["detections"]], abs=1e-6)
        # padding after the real rows
        assert (boxes[row, n:] == 0).all() and (scores[row, n:] == 0).all()
        assert (ids[row, n:] == -1).all() and set(labels[row, n:].tolist()) <= {""}


async def test_binary_extension_gives_the_json_answer(client: httpx.AsyncClient) -> None:
    as_json = await client.post(f"/v2/models/{VOC_DETECTOR}/infer", json=infer_json(IMAGES[:2]))
    body, headers = binary_request(IMAGES[:2], {"parameters": {"binary_data_output": True}})
    as_binary = await client.post(f"/v2/models/{VOC_DETECTOR}/infer", content=body, headers=headers)
    assert as_json.status_code == as_binary.status_code == 200, as_binary.text
    assert as_json.json()["outputs"] == as_binary.json()["outputs"]


async def test_requested_outputs_pick_and_order_the_tensors(client: httpx.AsyncClient) -> None:
    wanted = [{"name": "num_detections"}, {"name": "boxes", "parameters": {"binary_data": False}}]
    response = await client.post(
        f"/v2/models/{DETECTOR}/versions/1/infer", json=infer_json(IMAGES[:1], outputs=wanted)
    )
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["num_detections", "boxes"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"inputs": []}, 400, "exactly one tensor"),
        ({"inputs": [{"name": "img", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}, 400, "named"),
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "BYTES"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["eA=="]}]},
            400,
            "1 in 'data'",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 3], "data": ["eA=="]}]},
            400,
            "shape",
        ),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400, "base64"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]},
            400,
            "INVALID",
        ),
        ({**infer_json(IMAGES[:1]), "parameters": {"top_k": 0}}, 400, "top_k"),
        ({**infer_json(IMAGES[:1]), "parameters": {"score_threshold": 0.5}}, 400, "score_threshold"),
        ({**infer_json(IMAGES[:1]), "outputs": [{"name": "boxes"}]}, 400, "boxes"),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [99], "data": ["eA=="] * 99}]},
            413,
            "TOO_MANY",
        ),
    ],
)
async def test_malformed_requests_get_v2_errors(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, needle: str
) -> None:
    response = await client.post(f"/v2/models/{CLASSIFIER}/infer", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert isinstance(error["error"], str) and error["error"]  # the v2 error field
    assert needle in error["error"] or needle in error["code"]


async def test_malformed_binary_requests(client: httpx.AsyncClient) -> None:
    body, headers = binary_request(IMAGES[:2])
    truncated = await client.post(f"/v2/models/{CLASSIFIER}/infer", content=body[:-10], headers=headers)
    assert truncated.status_code == 400 and "binary_data_size" in truncated.json()["error"]
    liar = await client.post(
        f"/v2/models/{CLASSIFIER}/infer", content=body, headers={"Inference-Header-Content-Length": "9999999"}
    )
    assert liar.status_code == 400
    not_json = await client.post(f"/v2/models/{CLASSIFIER}/infer", content=b"\xff\xfe", headers={})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]


async def test_limits_apply_as_in_v1(tiny_models_file: Path) -> None:
    async with serve(tiny_models_file, max_body_bytes=2000, max_files=2, max_queue_images=2) as c:
        big = await c.post(f"/v2/models/{CLASSIFIER}/infer", json=infer_json([jpeg(200, 200)]))
        assert big.status_code == 413 and big.json()["code"] == "PAYLOAD_TOO_LARGE"
        many = await c.post(f"/v2/models/{CLASSIFIER}/infer", json=infer_json([png(4, 4)] * 3))
        assert many.status_code == 413 and many.json()["code"] == "TOO_MANY_FILES"
        broken = await c.post(f"/v2/models/{CLASSIFIER}/infer", json=infer_json([b"not an image"]))
        assert broken.status_code == 400 and broken.json()["code"] == "INVALID_IMAGE"


async def test_draining_refuses_new_work_and_readiness(tiny_models_file: Path) -> None:
    app = create_app(settings_for(models_file=tiny_models_file))
    async with running(app) as c:
        app.state.service.draining = True
        assert (await c.get("/v2/health/ready")).status_code == 503
        assert (await c.get(f"/v2/models/{CLASSIFIER}/ready")).json()["ready"] is False
        refused = await c.post(f"/v2/models/{CLASSIFIER}/infer", json=infer_json(IMAGES[:1]))
        assert refused.status_code == 503 and refused.json()["code"] == "DRAINING"
        assert refused.headers["Retry-After"]
        assert (await c.get("/v2/health/live")).status_code == 200


# -- a standard v2 client over real HTTP --------------------------------------------------------


@pytest.fixture(scope="module")
def live_url(tiny_models_file: Path) -> Iterator[str]:
    """The app under a real uvicorn, in a thread of this process (no second torch import)."""
    port = free_port()
    app = create_app(settings_for(models_file=tiny_models_file))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_drives_the_service(live_url: str, binary: bool) -> None:
    try:
        import tritonclient.http as tritonclient_http
    except ImportError:
        pytest.fail("tritonclient[http] is a test dependency: pip install -e '.[test]'")
    client = tritonclient_http.InferenceServerClient(url=live_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(VOC_DETECTOR)
        meta = client.get_model_metadata(VOC_DETECTOR)
        assert meta["inputs"][0]["datatype"] == "BYTES"

        if binary:
            data = np.array(UNEVEN, dtype=np.object_)
        else:  # JSON BYTES travel as strings: base64, as the protocol's JSON form asks
            data = np.array([b64(i).encode() for i in UNEVEN], dtype=np.object_)
        tensor = tritonclient_http.InferInput("image", [len(UNEVEN)], "BYTES")
        tensor.set_data_from_numpy(data, binary_data=binary)
        result = client.infer(VOC_DETECTOR, [tensor], parameters=DETECT_PARAMS)
        counts = result.as_numpy("num_detections")
        boxes = result.as_numpy("boxes")
        labels = result.as_numpy("labels")
        assert counts.shape == (3,) and boxes.shape == (3, int(counts.max()), 4)
        expected = httpx.post(
            f"http://{live_url}/v1/detect",
            params={"model": VOC_DETECTOR, **DETECT_PARAMS},
            files=[("file", ("x", i)) for i in UNEVEN],
            timeout=60,
        ).json()["results"]
        assert counts.tolist() == [len(r["detections"]) for r in expected]
        for row, r in enumerate(expected):
            n = len(r["detections"])
            names = [x.decode() if isinstance(x, bytes) else str(x) for x in labels[row, :n].tolist()]
            assert names == [d["label"] for d in r["detections"]]
            first = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in r["detections"]]
            assert boxes[row, :n].reshape(n, 4) == pytest.approx(np.array(first).reshape(n, 4), abs=1e-3)

        with pytest.raises(tritonclient_http.InferenceServerException, match="no model named"):
            client.infer("nope", [tensor])
    finally:
        client.close()
