"""Shared fixtures for tests/app: tiny checkpoints and their models file, the same models loaded
for reference answers, and a running app (lifespan entered, warmed up) with an async httpx client
over ASGI. Apps load their models from their models file; ``tests/conftest.py`` keeps what was
loaded, so each checkpoint is read once per session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.models_file import ModelsFile, read_models_file
from models import Classifier, Detector
from tests.app.harness import CLASSIFIER, serve, subset_models_file, tiny_models_toml
from tests.conftest import Loader


@pytest.fixture(scope="session")
def tiny_models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models_toml(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def classifier_models_file(tiny_models_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classifier alone."""
    return subset_models_file(tiny_models_file, [CLASSIFIER], tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of scikit-learn's two photos: real images, as a user's calibration folder would hold
    (int8 calibration, and the agreement check at start)."""
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


@pytest.fixture(scope="session")
def tiny_entries(tiny_models_file: Path) -> ModelsFile:
    return read_models_file(tiny_models_file)


@pytest.fixture(scope="session")
def tiny_predictors(tiny_entries: ModelsFile, load_once: Loader) -> list[Classifier | Detector]:
    """The tiny models (reference answers; the apps get copies of the same networks)."""
    return [load_once(spec) for spec in tiny_entries.specs]


@pytest.fixture(scope="session")
def predictor_by_name(tiny_predictors: list[Classifier | Detector]) -> dict[str, Classifier | Detector]:
    return {p.info.name: p for p in tiny_predictors}


@pytest.fixture(scope="session")
async def client(tiny_models_file: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The shared app: the three tiny models, default limits, batches of up to 4."""
    async with serve(tiny_models_file, max_batch_size=4) as c:
        yield c
