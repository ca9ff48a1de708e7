"""Shared fixtures for tests/app: tiny checkpoints, their models file, loaded predictors, and a
running app (lifespan entered, warmed up) with an async httpx client over ASGI.

Loading is the slow part, so the predictors are loaded once per session and shared by every app
the tests build; each app has its own batchers, threads and metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.models_file import ModelsFile, read_models_file
from app.service import load_predictors
from models import Predictor
from tests.app.harness import serve, settings_for, tiny_models_toml


@pytest.fixture(scope="session")
def tiny_models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models_toml(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_entries(tiny_models_file: Path) -> ModelsFile:
    return read_models_file(tiny_models_file)


@pytest.fixture(scope="session")
def tiny_predictors(tiny_entries: ModelsFile) -> list[Predictor]:
    return load_predictors(tiny_entries, settings_for())


@pytest.fixture(scope="session")
def predictor_by_name(tiny_predictors: list[Predictor]) -> dict[str, Predictor]:
    return {p.info.name: p for p in tiny_predictors}


@pytest.fixture(scope="session")
async def client(
    tiny_predictors: list[Predictor], tiny_entries: ModelsFile
) -> AsyncIterator[httpx.AsyncClient]:
    """The shared app: the three tiny models, default limits, batches of up to 4."""
    async with serve(tiny_predictors, tiny_entries, max_batch_size=4) as c:
        yield c
