"""What both training commands share: seeding, device, progress bars, the resume file, messages."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "TRAIN_STATE",
    "load_train_state",
    "plain_config",
    "progress",
    "resolve_device",
    "save_state_dict",
    "save_train_state",
    "say",
    "seed_everything",
    "warn",
    "width_label",
    "write_history",
]

#: The resume file in a run's output folder: model + optimizer state, epoch, history (not served).
TRAIN_STATE = "train_state.pth"

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


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here; use --device cpu")
    return device


def progress(items: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> tqdm[T]:
    """A tqdm bar over ``items`` on stderr; with ``enabled`` false, tqdm's silent pass-through (its
    ``set_postfix_str`` still works, as a no-op)."""
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not enabled)


def save_train_state(out: Path, state: Mapping[str, Any]) -> Path:
    """Write the resume file atomically (tensors and plain data only, so ``weights_only`` reads it)."""
    path = out / TRAIN_STATE
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def load_train_state(path: Path, command: str) -> dict[str, Any]:
    """The resume file at ``path`` (a run folder or the file itself), checked to come from ``command``."""
    if path.is_dir():
        path = path / TRAIN_STATE
    if not path.is_file():
        raise SystemExit(f"error: --resume {path}: no such file; give a run folder holding {TRAIN_STATE}")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("command") != command:
        raise SystemExit(f"error: --resume {path} comes from `{state.get('command')}`, not `{command}`")
    return state


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """``history.json``: one entry per epoch (losses, accuracy or mAP, seconds)."""
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")


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
