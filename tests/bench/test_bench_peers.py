"""The peer servers answer like the service and compute what the model computes: the plain FastAPI
endpoint over ASGI, LitServe's decode -> batch -> predict -> unbatch -> encode chain by hand, on
tiny (width 1/16) checkpoints and real photos."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from bench.inputs import write_images
from bench.load import make_payload
from bench.peers.common import DETECT_PARAMS
from models import VOC_CLASSES, Classifier, Detector, ModelSpec, load_model
from tests import checkpoint_factory as cf

TINY = 1 / 16


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("bench-photos")
    return [i.path.read_bytes() for i in write_images(folder, sizes=[(500, 375), (320, 240)])]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    path = cf.write_torchvision_vgg16(tmp_path_factory.mktemp("bench-vgg") / "vgg.pth", width=TINY)
    model = load_model(
        ModelSpec(name="vgg16", task="classify", arch="vgg16", format="torchvision", weights=path)
    )
    assert isinstance(model, Classifier)
    return model


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    path = cf.write_book_ssd(
        tmp_path_factory.mktemp("bench-ssd") / "ssd.pth", width=TINY, confident=True, gpu=False
    )
    spec = ModelSpec(name="ssd300", task="detect", arch="ssd300", format="ssd.pytorch", weights=path,
                     labels=VOC_CLASSES)  # fmt: skip
    model = load_model(spec)
    assert isinstance(model, Detector)
    return model


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


async def post(app: object, name: str, data: bytes) -> httpx.Response:
    payload = make_payload("p", [data])
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://peer") as client:
        return await client.post(f"/v1/models/{name}/predict", content=payload.body,
                                 headers={"Content-Type": payload.content_type})  # fmt: skip


async def test_plain_fastapi_classifies_like_the_model(classifier: Classifier, photos: list[bytes]) -> None:
    from bench.peers.fastapi_plain import create_app

    app = create_app(classifier)
    response = await post(app, "vgg16", photos[0])
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["image"] == {"width": 500, "height": 375}
    expected = classifier.predict(classifier.preprocess(rgb(photos[0])).unsqueeze(0), top_k=5)[0]
    assert [p["class_id"] for p in result["predictions"]] == expected.class_ids.tolist()
    assert [p["score"] for p in result["predictions"]] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    assert (await post(app, "other", photos[0])).status_code == 404
    assert (await post(app, "vgg16", b"not an image")).status_code == 400


async def test_plain_fastapi_detects(detector: Detector, photos: list[bytes]) -> None:
    from bench.peers.fastapi_plain import create_app

    response = await post(create_app(detector), "ssd300", photos[1])
    assert response.status_code == 200
    result = response.json()["results"][0]
    image = rgb(photos[1])
    expected = detector.predict(detector.preprocess(image).unsqueeze(0), [image.size], [DETECT_PARAMS])[0]
    assert len(result["detections"]) == len(expected.scores) > 0
    for det, box in zip(result["detections"], expected.boxes.tolist(), strict=True):
        assert det["label"] == VOC_CLASSES[det["class_id"]]
        assert [det["box"][k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx(box, abs=1e-3)


@pytest.mark.parametrize("which", ["classifier", "detector"])
def test_litserve_batches_keep_order_and_match_one_by_one(which: str, request: pytest.FixtureRequest,
                                                          photos: list[bytes]) -> None:  # fmt: skip
    from bench.peers.litserve_batched import VisionAPI

    predictor = request.getfixturevalue(which)
    name = predictor.info.name
    args = argparse.Namespace(model=name, max_batch_size=4, batch_timeout=0.01, work_dir=Path("."),
                              device="cpu", precision="fp32")  # fmt: skip
    api = VisionAPI(args)
    api.predictor = predictor  # what setup() loads from the benchmark checkpoint
    order = [photos[0], photos[1], photos[2], photos[0]]
    decoded = [api.decode_request({"file": SimpleNamespace(file=io.BytesIO(d))}) for d in order]  # type: ignore[arg-type]
    batched = [api.encode_response(o) for o in api.unbatch(api.predict(api.batch(decoded)))]
    assert len(batched) == len(order)
    for data, answer in zip(order, batched, strict=True):
        single = api.encode_response(api.unbatch(api.predict(api.batch([decoded[order.index(data)]])))[0])
        key = "predictions" if which == "classifier" else "detections"
        got, want = answer["results"][0], single["results"][0]
        assert got["image"] == want["image"] == dict(zip(("width", "height"), rgb(data).size, strict=True))
        assert [p["class_id"] for p in got[key]] == [p["class_id"] for p in want[key]]
        assert [p["score"] for p in got[key]] == pytest.approx([p["score"] for p in want[key]], abs=1e-4)
