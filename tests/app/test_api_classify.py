"""POST /v1/classify over ASGI: every request form, the response fields, query validation, images."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from models import Predictor
from tests.app.harness import CLASSIFIER, DETECTOR
from tests.app.helpers import encode, image_in_mode, jpeg, png


def check_classify(body: dict[str, Any], sizes: list[tuple[int, int]], top_k: int, labels: list[str]) -> None:
    assert body["model"] == CLASSIFIER
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert [r["index"] for r in body["results"]] == list(range(len(sizes)))
    for result, (width, height) in zip(body["results"], sizes, strict=True):
        assert result["image"] == {"width": width, "height": height}
        predictions = result["predictions"]
        assert len(predictions) == top_k
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        for p in predictions:
            assert set(p) == {"label", "class_id", "score"}
            assert labels[p["class_id"]] == p["label"]


@pytest.fixture(scope="module")
def labels(predictor_by_name: dict[str, Predictor]) -> list[str]:
    return predictor_by_name[CLASSIFIER].info.labels


async def test_multipart_one_file(client: httpx.AsyncClient, labels: list[str]) -> None:
    response = await client.post("/v1/classify", files={"file": ("a.jpg", jpeg(64, 48), "image/jpeg")})
    assert response.status_code == 200, response.text
    check_classify(response.json(), [(64, 48)], 5, labels)
    assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_multipart_several_files_keep_their_order(client: httpx.AsyncClient, labels: list[str]) -> None:
    sizes = [(64, 48), (30, 70), (100, 20), (41, 41), (90, 60), (12, 200)]  # more than one batch of 4
    files = [("file", (f"{i}.png", png(w, h, seed=i), "image/png")) for i, (w, h) in enumerate(sizes)]
    response = await client.post("/v1/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    check_classify(response.json(), sizes, 3, labels)


async def test_batched_answer_equals_one_by_one(client: httpx.AsyncClient) -> None:
    images = [png(64, 48, seed=i) for i in range(3)]
    together = await client.post(
        "/v1/classify", files=[("file", (f"{i}.png", b)) for i, b in enumerate(images)]
    )
    alone = [await client.post("/v1/classify", files={"file": ("x.png", b)}) for b in images]
    for joint, single in zip(together.json()["results"], alone, strict=True):
        one = single.json()["results"][0]["predictions"]
        assert [p["class_id"] for p in joint["predictions"]] == [p["class_id"] for p in one]
        assert [p["score"] for p in joint["predictions"]] == pytest.approx(
            [p["score"] for p in one], abs=1e-5
        )


async def test_other_form_parts_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/classify", data={"note": "hello"}, files={"file": ("a.jpg", jpeg(), "image/jpeg")}
    )
    assert response.status_code == 200 and len(response.json()["results"]) == 1


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/octet-stream"])
async def test_raw_body(client: httpx.AsyncClient, content_type: str, labels: list[str]) -> None:
    data = jpeg(50, 40)  # the bytes decide the format, not the header
    response = await client.post("/v1/classify", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    check_classify(response.json(), [(50, 40)], 5, labels)


async def test_json_one_image_and_data_url(client: httpx.AsyncClient, labels: list[str]) -> None:
    encoded = base64.b64encode(png(33, 22)).decode()
    for value in (encoded, f"data:image/png;base64,{encoded}"):
        response = await client.post("/v1/classify", json={"image": value}, params={"top_k": 1})
        assert response.status_code == 200, response.text
        check_classify(response.json(), [(33, 22)], 1, labels)


async def test_json_several_images(client: httpx.AsyncClient, labels: list[str]) -> None:
    sizes = [(20, 30), (40, 10), (25, 25)]
    images = [base64.b64encode(png(w, h)).decode() for w, h in sizes]
    images[1] = base64.encodebytes(png(40, 10)).decode()  # line-wrapped base64 is fine too
    response = await client.post("/v1/classify", json={"images": images})
    assert response.status_code == 200, response.text
    check_classify(response.json(), sizes, 5, labels)


@pytest.mark.parametrize("top_k", [1, 7, 1000])
async def test_top_k(client: httpx.AsyncClient, top_k: int, labels: list[str]) -> None:
    response = await client.post(
        "/v1/classify", params={"top_k": top_k}, content=png(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    check_classify(response.json(), [(64, 48)], top_k, labels)


@pytest.mark.parametrize("value", ["0", "1001", "-3", "abc", "2.5"])
async def test_bad_top_k_is_422_naming_the_parameter(client: httpx.AsyncClient, value: str) -> None:
    response = await client.post("/v1/classify", params={"top_k": value}, files={"file": ("a.png", png())})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR" and "top_k" in body["error"]
    assert body["request_id"] == response.headers["x-request-id"]


async def test_unknown_query_parameter_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", params={"topk": 3}, files={"file": ("a.png", png())})
    assert response.status_code == 422 and "topk" in response.json()["error"]


async def test_named_model_and_its_errors(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v1/classify", params={"model": CLASSIFIER}, files={"file": ("a.png", png())})
    assert ok.status_code == 200 and ok.json()["model"] == CLASSIFIER
    wrong = await client.post("/v1/classify", params={"model": DETECTOR}, files={"file": ("a.png", png())})
    assert wrong.status_code == 409 and wrong.json()["code"] == "WRONG_TASK"
    missing = await client.post("/v1/classify", params={"model": "nope"}, files={"file": ("a.png", png())})
    assert missing.status_code == 404 and missing.json()["code"] == "MODEL_NOT_FOUND"


async def test_every_image_mode_in_one_request(client: httpx.AsyncClient) -> None:
    cases = [
        ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("PA", "TIFF"), ("RGBA", "PNG"),
        ("CMYK", "JPEG"), ("YCbCr", "TIFF"), ("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
        ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "GIF"),
    ]  # fmt: skip
    files = []
    for i, (mode, fmt) in enumerate(cases):
        data = encode(image_in_mode(mode, 30 + i, 20 + i), fmt)  # test_images.py checks the stored modes
        files.append(("file", (f"{i}.{fmt.lower()}", data)))
    response = await client.post("/v1/classify", files=files, params={"top_k": 2})
    assert response.status_code == 200, response.text
    sizes = [r["image"] for r in response.json()["results"]]
    assert sizes == [{"width": 30 + i, "height": 20 + i} for i in range(len(cases))]


async def test_exif_rotation_swaps_width_and_height(client: httpx.AsyncClient) -> None:
    rotated = jpeg(80, 40, orientation=6)  # stored 80x40, displayed 40x80
    upright = encode(Image.open(io.BytesIO(rotated)).convert("RGB").rotate(-90, expand=True), "PNG")
    response = await client.post(
        "/v1/classify", files=[("file", ("r.jpg", rotated)), ("file", ("u.png", upright))]
    )
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["image"] == {"width": 40, "height": 80}
    # the model saw the displayed picture: same answer as for the same pixels stored upright
    assert [p["class_id"] for p in first["predictions"]] == [p["class_id"] for p in second["predictions"]]
    assert [p["score"] for p in first["predictions"]] == pytest.approx(
        [p["score"] for p in second["predictions"]], abs=1e-6
    )


async def test_json_errors(client: httpx.AsyncClient) -> None:
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", '"image"'),
        (b"{}", '"image"'),
        (json.dumps({"image": "aGVsbG8", "images": ["x"]}).encode(), '"image"'),
        (json.dumps({"image": "@@@not base64@@@"}).encode(), "image is not valid base64"),
        (json.dumps({"image": 42}).encode(), "base64 string"),
        (json.dumps({"images": "abc"}).encode(), "non-empty list"),
        (json.dumps({"images": []}).encode(), "non-empty list"),
        (json.dumps({"images": ["aGVsbG8=", 3]}).encode(), "images[1]"),
        (json.dumps({"image": "data:image/png,abcd"}).encode(), "data: URL"),
    ]
    for body, words in cases:
        response = await client.post(
            "/v1/classify", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, body
        assert response.json()["code"] == "VALIDATION_ERROR"
        assert words in response.json()["error"], (body, response.json())


async def test_json_base64_of_garbage_is_invalid_image(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", json={"image": base64.b64encode(b"hello world").decode()})
    assert response.status_code == 400 and response.json()["code"] == "INVALID_IMAGE"
