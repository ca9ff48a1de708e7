"""VISION_PRECISION=int8: CPU only, calibrated on the models' own kind of images, never silently."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from app.inference import StartupError, load_models
from app.metrics import Metrics
from app.models_file import read_models_file
from models import Classifier, Detector
from tests.app.harness import CLASSIFIER, DETECTOR, serve, settings_for


def test_int8_is_refused_on_cuda_at_settings_time() -> None:
    with pytest.raises(ValidationError, match="CPU only"):
        settings_for(precision="int8", device="cuda")


def test_int8_loads_fp32_weights_on_the_cpu() -> None:
    settings = settings_for(precision="int8", device="cpu")
    assert settings.int8 and settings.torch_precision == "fp32"
    assert not settings_for(precision="bf16").int8


def test_int8_without_calibration_images_stops_the_start(tiny_models_file: Path) -> None:
    with pytest.raises(StartupError, match="VISION_INT8_CALIBRATION_DIR"):
        load_models(settings_for(precision="int8", models_file=tiny_models_file), Metrics())


def test_calibration_dir_in_the_models_file_is_relative_to_it(tmp_path: Path) -> None:
    models = tmp_path / "m" / "models.toml"
    models.parent.mkdir()
    models.write_text(
        '[[models]]\nname = "c"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "v.pth"\ncalibration_dir = "calib"\n'
    )
    assert read_models_file(models).calibration_dirs == {"c": models.parent / "calib"}


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of scikit-learn's two photos: real images, as a user's calibration folder would hold."""
    folder = tmp_path_factory.mktemp("calib")
    for name in ("china.jpg", "flower.jpg"):
        with Image.open(str(files("sklearn.datasets") / "images" / name)) as photo:
            photo = photo.convert("RGB")
            width, height = photo.size
            for index, box in enumerate(
                [
                    (0, 0, width, height),
                    (0, 0, width // 2, height // 2),
                    (width // 3, height // 3, width, height),
                ]
            ):
                photo.crop(box).save(folder / f"{Path(name).stem}-{index}.png")
    return folder


def test_int8_predictors_are_quantized(
    tiny_models_file: Path, calibration_dir: Path, tiny_predictors: list[Classifier | Detector]
) -> None:
    settings = settings_for(
        precision="int8", int8_calibration_dir=calibration_dir, models_file=tiny_models_file
    )
    int8_predictors = [loaded.predictor for loaded in load_models(settings, Metrics())]
    assert [p.info.dtype for p in int8_predictors] == ["int8"] * len(int8_predictors)
    # the shared fp32 models are not touched by quantizing copies of them
    assert [p.info.dtype for p in tiny_predictors] == ["float32"] * len(tiny_predictors)


async def test_int8_models_serve_the_same_contract(tiny_models_file: Path, calibration_dir: Path) -> None:
    photo = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()
    async with serve(tiny_models_file, precision="int8", int8_calibration_dir=calibration_dir) as client:
        listed = {m["name"]: m["dtype"] for m in (await client.get("/v1/models")).json()["models"]}
        assert listed[CLASSIFIER] == listed[DETECTOR] == "int8"
        classified = await client.post("/v1/classify?top_k=3", files={"file": ("c.jpg", photo, "image/jpeg")})
        assert classified.status_code == 200
        scores = [p["score"] for p in classified.json()["results"][0]["predictions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
        upload = {"file": ("c.jpg", photo, "image/jpeg")}
        detected = await client.post("/v1/detect?score_threshold=0.3", files=upload)
        assert detected.status_code == 200
        detections = detected.json()["results"][0]["detections"]
        assert detections  # the tiny detector is built to be confident; int8 keeps that
        for det in detections:
            box = det["box"]
            assert 0 <= box["x1"] < box["x2"] <= 640 and 0 <= box["y1"] < box["y2"] <= 427
