"""Full-size (width 1) VGG16 and SSD300 end to end through the ASGI app: the HTTP answer equals
the model's own answer for the same photo (random weights in the real checkpoint layouts)."""

from __future__ import annotations

import importlib.resources
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from app.images import decode_image
from app.models_file import ModelsFile, read_models_file
from models import Classifier, Detector, DetectParams
from tests import checkpoint_factory as cf
from tests.app.harness import serve
from tests.conftest import Loader

pytestmark = pytest.mark.slow


def photo_bytes(name: str) -> bytes:
    return (importlib.resources.files("sklearn.datasets") / "images" / name).read_bytes()


@pytest.fixture(scope="session")
def full_entries(tmp_path_factory: pytest.TempPathFactory) -> ModelsFile:
    folder = tmp_path_factory.mktemp("full-size")
    cf.write_torchvision_vgg16(folder / "vgg16-397923af.pth")
    cf.write_torchvision_ssd300(folder / "ssd300_vgg16_coco-b556d3b4.pth", confident=True)
    path = folder / "models.toml"
    path.write_text(
        '[[models]]\nname = "vgg16"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "vgg16-397923af.pth"\n\n'
        '[[models]]\nname = "ssd300"\ntask = "detect"\narch = "ssd300"\nformat = "torchvision"\n'
        'weights = "ssd300_vgg16_coco-b556d3b4.pth"\n'
    )
    return read_models_file(path)


@pytest.fixture(scope="session")
def full_predictors(full_entries: ModelsFile, load_once: Loader) -> dict[str, Classifier | Detector]:
    return {spec.name: load_once(spec) for spec in full_entries.specs}


@pytest.fixture(scope="session")
async def full_client(
    full_entries: ModelsFile, full_predictors: dict[str, Classifier | Detector]
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(full_entries.path, max_batch_size=1) as client:
        yield client


async def test_full_size_vgg16_classify(
    full_client: httpx.AsyncClient, full_predictors: dict[str, Classifier | Detector]
) -> None:
    data = photo_bytes("china.jpg")
    response = await full_client.post("/v1/classify", files={"file": ("china.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["image"] == {"width": 640, "height": 427}

    vgg = full_predictors["vgg16"]
    assert isinstance(vgg, Classifier)
    assert vgg.info.input_size == (224, 224) and vgg.info.num_classes == 1000
    image = decode_image(data, 40_000_000)
    (expected,) = vgg.predict(torch.stack([vgg.preprocess(image)]), top_k=5)
    assert [p["class_id"] for p in result["predictions"]] == expected.class_ids.tolist()
    assert [p["score"] for p in result["predictions"]] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    assert [p["label"] for p in result["predictions"]] == [
        vgg.info.labels[i] for i in expected.class_ids.tolist()
    ]


async def test_full_size_ssd300_detect(
    full_client: httpx.AsyncClient, full_predictors: dict[str, Classifier | Detector]
) -> None:
    data = photo_bytes("flower.jpg")
    response = await full_client.post("/v1/detect", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["image"] == {"width": 640, "height": 427}

    ssd = full_predictors["ssd300"]
    assert isinstance(ssd, Detector)
    image = decode_image(data, 40_000_000)
    (expected,) = ssd.predict(torch.stack([ssd.preprocess(image)]), [image.size], [DetectParams()])
    detections = result["detections"]
    assert len(detections) == len(expected.scores) > 0
    assert [d["class_id"] for d in detections] == expected.class_ids.tolist()
    boxes = [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections]
    torch.testing.assert_close(torch.tensor(boxes), expected.boxes.float(), rtol=0, atol=1e-3)
    assert [d["score"] for d in detections] == pytest.approx(expected.scores.tolist(), abs=1e-6)


def test_full_size_checkpoints_are_real_size(full_entries: ModelsFile) -> None:
    sizes = {spec.name: Path(spec.weights).stat().st_size for spec in full_entries.specs}
    assert sizes["vgg16"] > 500e6 and sizes["ssd300"] > 90e6  # 528 MB and 100 MB as published
