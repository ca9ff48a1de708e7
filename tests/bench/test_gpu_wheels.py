"""bench.gpu_wheels: the pins it would download for the GPU machine (no network)."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

from bench.gpu_wheels import PROVIDED, ROOTS, closure


def test_the_web_stack_and_its_requirements_are_pinned_at_the_tested_versions() -> None:
    pins = closure(ROOTS)
    for name in ("fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "pytest-asyncio"):
        assert pins[name] == metadata.version(name), name
    # requirements reached only through another package are there too
    assert {"annotated-types", "typing-inspection", "python-dotenv", "h11"} <= set(pins)
    assert not set(pins) & PROVIDED  # the machine's torch, numpy, pillow ... are kept


def test_what_the_machine_provides_is_never_downloaded() -> None:
    assert closure(["torchvision"]) == {}  # torchvision needs torch, numpy, pillow: all provided
    pins = closure(["torchvision"], provided=frozenset({"torch"}))
    assert {"torchvision", "numpy", "pillow"} <= set(pins) and "torch" not in pins


def test_a_requirement_missing_here_is_named() -> None:
    with pytest.raises(LookupError, match="no-such-dist-xyz"):
        closure(["no-such-dist-xyz"])
