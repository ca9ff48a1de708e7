"""Fixtures for the whole suite.

``load_once``: every app a test builds loads its models through ``app.inference``'s loader, from
its models file, as a real start does. Loading the same checkpoint again gives the same network, so
the loader is wrapped to keep what it loaded (keyed by the spec, device, precision and the file's
size and mtime) and to hand each caller its own shallow copy: apps share weights, never state.
Tests that need the same models for reference answers call the fixture's loader.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import app.inference
from models import Classifier, Detector, ModelSpec, load_model

Loader = Callable[..., Classifier | Detector]


@pytest.fixture(scope="session", autouse=True)
def load_once() -> Iterator[Loader]:
    cache: dict[Any, Classifier | Detector] = {}

    def cached_load_model(
        spec: ModelSpec, device: str = "cpu", precision: Any = "fp32"
    ) -> Classifier | Detector:
        stat = os.stat(spec.weights) if os.path.exists(spec.weights) else None
        key = (spec, str(device), precision, stat and (stat.st_size, stat.st_mtime_ns))
        if key not in cache:
            cache[key] = load_model(spec, device=device, precision=precision)
        return copy.copy(cache[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app.inference, "load_model", cached_load_model)
        yield cached_load_model
