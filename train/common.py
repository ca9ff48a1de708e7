"""Small helpers both training commands use: messages, seeding, the device, progress bars, and the
plain forms of widths, configs and state_dicts that files and messages carry."""

from __future__ import annotations

import dataclasses
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from models.predictors import resolve_device

__all__ = [
    "plain_config",
    "progress",
    "save_state_dict",
    "say",
    "seed_everything",
    "training_device",
    "warn",
    "width_label",
]

T = TypeVar("T")


def say(message: str) -> None:
    """One line of the run's report, on stderr (tqdm writes there too, so the lines interleave cleanly)."""
    tqdm.write(message, file=sys.stderr)


def warn(message: str) -> None:
    """A run that goes on, but not the way the user probably meant (e.g. no ImageNet weights)."""
    say(f"WARNING: {message}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the book seeds all three with 1234)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), else the service's own ``cpu``, ``cuda`` or
    ``cuda:N`` (``models.ModelConfigError`` when that device is not there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(name)


def progress(items: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> tqdm[T]:
    """A tqdm bar over ``items`` on stderr; with ``enabled`` false, tqdm's silent pass-through (its
    ``set_postfix_str`` still works, as a no-op)."""
    return tqdm(
        items, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not enabled
    )


def width_label(width: float) -> str:
    """A channel-width multiplier as people write it: 1/16 for 0.0625, 1 for 1.0, else the number."""
    if width < 1 and abs(1 / width - round(1 / width)) < 1e-9:
        return f"1/{round(1 / width)}"
    return f"{width:g}"


def plain_config(cfg: Any) -> dict[str, Any]:
    """A command's config dataclass as plain values (paths as strings, tuples as lists), for the
    resume file and the checkpoint's metadata."""
    plain: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        plain[key] = value
    return plain


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """The model's bare state_dict on the CPU, as the book saves it (``torch.save(net.state_dict())``)."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
