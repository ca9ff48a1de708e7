"""VISION_PRECISION=int8: CPU only, calibrated on the models' own kind of images, never silently."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
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
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert listed[CLASSIFIER]["dtype"] == listed[DETECTOR]["dtype"] == "int8"
        assert listed[CLASSIFIER]["runtime"] == listed[DETECTOR]["runtime"] == "torch"
        # the agreement check at start, against torch fp32 on the six calibration images
        agreement = listed[CLASSIFIER]["agreement"]
        assert agreement["images"] == 6 and 0 < agreement["top1_agreement"] <= 1
        boxes = listed[DETECTOR]["agreement"]
        assert boxes["images"] == 6 and boxes["reference_detections"] > 0
        assert 0 < boxes["high_iou_recall"] <= boxes["recall"] <= 1
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
