"""POST /v1/detect and /v1/models/{name}/predict over ASGI: boxes, parameters, formats, EXIF."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image

from models import Predictor
from tests.app.harness import CLASSIFIER, DETECTOR, VOC_DETECTOR
from tests.app.helpers import encode, jpeg, png


async def detect(client: httpx.AsyncClient, data: bytes, **params: Any) -> dict[str, Any]:
    response = await client.post("/v1/detect", params=params, files={"file": ("x", data)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def check_detections(result: dict[str, Any], labels: list[str], threshold: float, limit: int) -> None:
    width, height = result["image"]["width"], result["image"]["height"]
    detections = result["detections"]
    assert len(detections) <= limit
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        assert threshold <= d["score"] <= 1.0
        assert labels[d["class_id"]] == d["label"]
        box = d["box"]
        assert 0 <= box["x1"] < box["x2"] <= width and 0 <= box["y1"] < box["y2"] <= height


@pytest.fixture(scope="module")
def coco_labels(predictor_by_name: dict[str, Predictor]) -> list[str]:
    return predictor_by_name[DETECTOR].info.labels


async def test_default_detector_and_defaults(client: httpx.AsyncClient, coco_labels: list[str]) -> None:
    body = await detect(client, jpeg(160, 120))
    assert body["model"] == DETECTOR
    (result,) = body["results"]
    assert result["index"] == 0 and result["image"] == {"width": 160, "height": 120}
    assert result["detections"], "the confident tiny detector finds something"
    check_detections(result, coco_labels, 0.5, 100)
    assert "__background__" not in {d["label"] for d in result["detections"]}
    assert set(result["detections"][0]) == {"label", "class_id", "score", "box"}


async def test_thresholds_and_cap(client: httpx.AsyncClient, coco_labels: list[str]) -> None:
    data = jpeg(160, 120)
    loose = (await detect(client, data, score_threshold=0.0, max_detections=4000))["results"][0]["detections"]
    strict = (await detect(client, data, score_threshold=0.99))["results"][0]["detections"]
    capped = (await detect(client, data, score_threshold=0.0, max_detections=2))["results"][0]["detections"]
    assert len(loose) > len(capped) == 2
    assert capped == loose[:2]
    assert all(d["score"] >= 0.99 for d in strict) and len(strict) <= len(loose)
    # a lower NMS IoU suppresses more boxes (the book-semantics VOC model has no 200-box cap)
    voc = {"model": VOC_DETECTOR, "score_threshold": 0.0, "max_detections": 4000}
    usual = (await detect(client, data, **voc))["results"][0]["detections"]
    tight = (await detect(client, data, iou_threshold=0.05, **voc))["results"][0]["detections"]
    assert 0 < len(tight) < len(usual)


async def test_box_formats_and_normalized(client: httpx.AsyncClient) -> None:
    data = jpeg(200, 100)
    xyxy = (await detect(client, data, normalized="true"))["results"][0]["detections"]
    cxcywh = (await detect(client, data, box_format="cxcywh"))["results"][0]["detections"]
    xywh = (await detect(client, data, box_format="xywh", normalized=1))["results"][0]["detections"]
    assert len(xyxy) == len(cxcywh) == len(xywh) > 0
    for a, b, c in zip(xyxy, cxcywh, xywh, strict=True):
        box = a["box"]
        assert a["box_normalized"] == pytest.approx(
            {"x1": box["x1"] / 200, "y1": box["y1"] / 100, "x2": box["x2"] / 200, "y2": box["y2"] / 100}
        )
        w, h = box["x2"] - box["x1"], box["y2"] - box["y1"]
        assert b["box"] == pytest.approx({"cx": box["x1"] + w / 2, "cy": box["y1"] + h / 2, "w": w, "h": h})
        assert c["box"] == pytest.approx({"x": box["x1"], "y": box["y1"], "w": w, "h": h})
        assert c["box_normalized"] == pytest.approx(
            {"x": box["x1"] / 200, "y": box["y1"] / 100, "w": w / 200, "h": h / 100}
        )
        assert "box_normalized" not in b


async def test_named_detector_uses_its_labels_and_defaults(
    client: httpx.AsyncClient, predictor_by_name: dict[str, Predictor]
) -> None:
    labels = predictor_by_name[VOC_DETECTOR].info.labels
    assert labels[0] == "aeroplane" and len(labels) == 20
    body = await detect(client, jpeg(160, 120), model=VOC_DETECTOR)
    assert body["model"] == VOC_DETECTOR
    check_detections(body["results"][0], labels, 0.6, 100)  # score_threshold 0.6 from the models file


async def test_detect_errors(client: httpx.AsyncClient) -> None:
    wrong = await client.post("/v1/detect", params={"model": CLASSIFIER}, files={"file": ("a", png())})
    assert wrong.status_code == 409 and wrong.json()["code"] == "WRONG_TASK"
    missing = await client.post("/v1/detect", params={"model": "nope"}, files={"file": ("a", png())})
    assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("score_threshold", "-0.1"),
        ("score_threshold", "1.5"),
        ("score_threshold", "high"),
        ("iou_threshold", "0"),
        ("iou_threshold", "1.01"),
        ("max_detections", "0"),
        ("max_detections", "10001"),
        ("box_format", "yxyx"),
        ("normalized", "maybe"),
        ("top_k", "3"),
    ],
)
async def test_bad_detect_parameters(client: httpx.AsyncClient, name: str, value: str) -> None:
    response = await client.post("/v1/detect", params={name: value}, files={"file": ("a", png())})
    assert response.status_code == 422
    assert response.json()["code"] == "VALIDATION_ERROR" and name in response.json()["error"]


async def test_exif_rotated_boxes_are_in_display_coordinates(client: httpx.AsyncClient) -> None:
    rotated = jpeg(240, 120, orientation=8)  # stored 240x120, displayed 120x240
    upright = encode(Image.open(io.BytesIO(rotated)).convert("RGB").rotate(90, expand=True), "PNG")
    params = {"score_threshold": 0.0, "max_detections": 50}
    response = await client.post(
        "/v1/detect", params=params, files=[("file", ("r.jpg", rotated)), ("file", ("u.png", upright))]
    )
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["image"] == second["image"] == {"width": 120, "height": 240}
    assert first["detections"]
    for d in first["detections"]:
        assert d["box"]["x2"] <= 120 and d["box"]["y2"] <= 240
    assert max(d["box"]["y2"] for d in first["detections"]) > 120  # beyond the stored height
    assert first["detections"] == second["detections"]  # same pixels once rotated: same boxes


async def test_predict_endpoint_runs_each_models_task(client: httpx.AsyncClient) -> None:
    classify = await client.post(
        f"/v1/models/{CLASSIFIER}/predict", params={"top_k": 2}, files={"file": ("a", png())}
    )
    assert classify.status_code == 200 and len(classify.json()["results"][0]["predictions"]) == 2
    found = await client.post(
        f"/v1/models/{VOC_DETECTOR}/predict",
        params={"box_format": "xywh"},
        files={"file": ("a", jpeg(160, 120))},
    )
    assert found.status_code == 200 and found.json()["model"] == VOC_DETECTOR
    assert all(set(d["box"]) == {"x", "y", "w", "h"} for d in found.json()["results"][0]["detections"])


async def test_predict_endpoint_errors(client: httpx.AsyncClient) -> None:
    missing = await client.post("/v1/models/nope/predict", files={"file": ("a", png())})
    assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"
    misplaced = await client.post(
        f"/v1/models/{DETECTOR}/predict", params={"top_k": 3}, files={"file": ("a", png())}
    )
    assert misplaced.status_code == 422 and "top_k" in misplaced.json()["error"]
    misplaced = await client.post(
        f"/v1/models/{CLASSIFIER}/predict", params={"score_threshold": 0.3}, files={"file": ("a", png())}
    )
    assert misplaced.status_code == 422 and "score_threshold" in misplaced.json()["error"]
    extra = await client.post(
        f"/v1/models/{CLASSIFIER}/predict", params={"model": "x"}, files={"file": ("a", png())}
    )
    assert extra.status_code == 422


async def test_batched_detections_equal_one_by_one(client: httpx.AsyncClient) -> None:
    images = [jpeg(160, 120, seed=i) for i in range(3)]
    params = {"score_threshold": 0.3}
    joint = await client.post(
        "/v1/detect", params=params, files=[("file", (str(i), b)) for i, b in enumerate(images)]
    )
    for result, data in zip(joint.json()["results"], images, strict=True):
        single = (await detect(client, data, **params))["results"][0]
        assert [d["class_id"] for d in result["detections"]] == [d["class_id"] for d in single["detections"]]
        for a, b in zip(result["detections"], single["detections"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["box"] == pytest.approx(b["box"], abs=1e-3)
