"""``ModelSpec`` checks itself when it is made: everything that needs no file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models import ModelConfigError, ModelSpec


def spec_error(**fields: Any) -> str:
    values: dict[str, Any] = {"name": "m", "task": "detect", "arch": "ssd300", "format": "auto"}
    values.update(fields)
    with pytest.raises(ModelConfigError) as info:
        ModelSpec(weights=Path("unused.pth"), **values)
    return str(info.value)


def test_names_outside_the_known_lists_are_refused() -> None:
    assert "unknown arch 'resnet50'" in spec_error(task="classify", arch="resnet50")
    assert "unknown format 'onnx'" in spec_error(format="onnx")
    assert "unknown task 'segment'" in spec_error(task="segment")


def test_the_arch_decides_the_task() -> None:
    message = spec_error(task="detect", arch="vgg16")
    assert "model 'm'" in message and "'vgg16' is a classify model" in message and "'detect'" in message
    assert "'ssd512' is a detect model" in spec_error(task="classify", arch="ssd512")


def test_options_of_the_other_task_are_refused() -> None:
    assert "resize do(es) not apply to a detect model" in spec_error(resize=300)
    assert "top_k" in spec_error(top_k=3)
    message = spec_error(task="classify", arch="vgg16", score_threshold=0.3, max_detections=5)
    assert "score_threshold, max_detections" in message and "classify model" in message


def test_sizes_are_positive() -> None:
    assert "crop must be at least 1" in spec_error(task="classify", arch="vgg16", crop=0)


def test_request_defaults_are_the_options_it_sets() -> None:
    spec = ModelSpec(
        name="d", task="detect", arch="ssd300", format="auto", weights=Path("w"), iou_threshold=0.3
    )
    assert spec.request_defaults() == {"iou_threshold": 0.3}
    classifier = ModelSpec(name="c", task="classify", arch="vgg16", format="auto", weights=Path("w"), top_k=2)
    assert classifier.request_defaults() == {"top_k": 2}
