"""The steps of a training run that the classifier and the detector share.

- :func:`make_loader`: a DataLoader whose shuffle order comes from its own seeded generator;
- :func:`run_epoch`: one pass over a loader, training (with an optimizer) or evaluating, the
  command supplying only the step that computes a batch's loss;
- :func:`end_epoch`: the files of an epoch: ``best.pth`` / ``last.pth`` in the project format the
  service loads as they are (and the book's plain state_dict), the resume file, ``history.json``;
- :class:`RunState`: the resume file, written after every epoch, that makes ``--resume`` an exact
  continuation: model, optimizer, scheduler, the loader's shuffle generator and the global random
  generators (Python, NumPy, torch, CUDA), checked against the flags that shape the network.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from models.checkpoints import read_checkpoint, save_project_checkpoint
from models.types import Task
from train.common import progress, save_state_dict, warn
from train.errors import TrainError

__all__ = [
    "TRAIN_STATE",
    "CheckpointFormat",
    "RunState",
    "Step",
    "end_epoch",
    "make_loader",
    "prefixed",
    "run_epoch",
    "serve_entry",
    "write_checkpoint",
]

#: The resume file in a run's output folder (not served).
TRAIN_STATE = "train_state.pth"

#: A command's step: batch -> (mean loss of the batch, its number of images, other per-image means
#: to report, e.g. {"acc": 0.75}).
Step = Callable[[Any], tuple[Tensor, int, dict[str, float]]]


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    workers: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    collate_fn: Callable[[Any], Any] | None = None,
) -> DataLoader[Any]:
    """A loader over ``dataset``. A shuffled one draws its order (and its workers' seeds) from its
    own generator seeded with ``seed``, which :class:`RunState` saves. Workers start afresh each
    epoch (no ``persistent_workers``): their random transforms then follow the saved states too."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def run_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    step: Step,
    optimizer: Optimizer | None = None,
    *,
    scheduler: LRScheduler | None = None,
    clip: float | None = None,
    show: bool = False,
    desc: str = "",
    diverged: str = "lower the learning rate",
) -> dict[str, float]:
    """One pass over ``loader``: trains when ``optimizer`` is given (then ``clip_grad_value_`` at
    ``clip`` and one ``scheduler`` step per batch), else evaluates without gradients.

    Returns {"loss": .., and each of the step's other numbers}, each the mean over the images (a
    batch's value weighted by its size). BatchNorm layers whose parameters are all frozen stay in
    eval mode while training, so their running statistics do not move either. A training loss that
    is not finite stops the run with a TrainError that ends with ``diverged`` (what to change).
    """
    training = optimizer is not None
    model.train(training)
    if training:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
    sums: dict[str, float] = {}
    seen = 0
    with torch.set_grad_enabled(training):
        bar = progress(loader, show, desc)
        for index, batch in enumerate(bar):
            loss, size, others = step(batch)
            value = float(loss.item())
            if optimizer is not None:
                if not math.isfinite(value):
                    raise TrainError(f"the loss became {value} in {desc} (batch {index}); {diverged}")
                optimizer.zero_grad()
                torch.autograd.backward(loss)  # Tensor.backward has no annotations; this is the typed form
                if clip is not None:
                    nn.utils.clip_grad_value_(model.parameters(), clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            for key, number in {"loss": value, **others}.items():
                sums[key] = sums.get(key, 0.0) + number * size
            seen += size
            bar.set_postfix_str(" ".join(f"{k} {v / seen:.3f}" for k, v in sums.items()), refresh=False)
    if seen == 0:
        raise TrainError(f"{desc}: no images; put images in every split (and class folder)")
    return {key: total / seen for key, total in sums.items()}


def prefixed(prefix: str, numbers: Mapping[str, float]) -> dict[str, float]:
    """``{"loss": 1.0}`` -> ``{"train_loss": 1.0}`` for ``prefix`` "train"."""
    return {f"{prefix}_{key}": value for key, value in numbers.items()}


@dataclass(frozen=True)
class CheckpointFormat:
    """What a run's checkpoints say about the model besides its weights (see
    ``models.checkpoints.project_checkpoint``); ``state_dict``: also write the book's plain file."""

    task: Task
    arch: str
    labels: Sequence[str]
    preprocess: Mapping[str, Any]
    postprocess: Mapping[str, Any] | None = None
    state_dict: bool = False


def write_checkpoint(
    out: Path, name: str, model: nn.Module, form: CheckpointFormat, metadata: Mapping[str, Any]
) -> Path:
    """``out/<name>.pth`` in the project format the service loads as it is; with ``form.state_dict``
    also ``out/<name>_state_dict.pth``, the book's ``torch.save(net.state_dict())``."""
    path = save_project_checkpoint(
        out / f"{name}.pth",
        model,
        task=form.task,
        arch=form.arch,
        labels=form.labels,
        preprocess=form.preprocess,
        postprocess=form.postprocess,
        metadata=metadata,
    )
    if form.state_dict:
        save_state_dict(model, out / f"{name}_state_dict.pth")
    return path


def end_epoch(
    run: RunState,
    out: Path,
    served: nn.Module,
    form: CheckpointFormat,
    metadata: Mapping[str, Any],
    history: list[dict[str, Any]],
    improved: bool,
    progress: Mapping[str, Any],
) -> None:
    """The files of a finished epoch: ``best.pth`` when the score ``improved``, ``last.pth`` (both
    of ``served``, the model as the service will load it), and the resume file with ``progress``
    (epoch, best score, ...) and ``history.json``."""
    if improved:
        write_checkpoint(out, "best", served, form, metadata)
    write_checkpoint(out, "last", served, form, metadata)
    run.save(out, history, **progress)


def serve_entry(best: Path, name: str, task: Task, arch: str) -> str:
    """The models-file entry that serves ``best``, as the end of a run prints it."""
    return (
        f'serve it with a models file entry:\n[[models]]\nname = "{name}"\ntask = "{task}"\n'
        f'arch = "{arch}"\nformat = "project"\nweights = "{best.resolve()}"'
    )


class RunState:
    """What ``--resume`` restores, and the file it restores it from.

    ``flags`` are the options that shape the network (architecture, width, labels, ...): a resume
    file written with other values is refused. ``config`` (every option) is kept for the record.
    :meth:`save` writes ``train_state.pth`` (tensors and plain data only, so ``weights_only`` reads
    it) and ``history.json``; :meth:`restore` loads the model, optimizer, scheduler, the loader's
    generator and the global random generators and returns the rest of the saved dict (epoch,
    history, best score, ...).
    """

    def __init__(
        self,
        command: str,
        flags: Mapping[str, Any],
        config: Mapping[str, Any],
        model: nn.Module,
        optimizer: Optimizer,
        loader: DataLoader[Any],
        scheduler: LRScheduler | None = None,
    ) -> None:
        self.command = command
        self.flags = dict(flags)
        self.config = dict(config)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        if loader.generator is None:
            raise ValueError("RunState needs a shuffled loader from make_loader (one with a generator)")
        self.generator: torch.Generator = loader.generator

    def save(self, out: Path, history: list[dict[str, Any]], **progress: Any) -> Path:
        """Write the resume file atomically and ``history.json`` (one entry per epoch)."""
        state = {
            "command": self.command,
            "flags": self.flags,
            "config": self.config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "sampler": self.generator.get_state(),
            "rng": _rng_states(),
            "history": history,
            **progress,
        }
        path = out / TRAIN_STATE
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        return path

    def restore(self, path: Path) -> dict[str, Any]:
        """Load ``path`` (a run folder or its resume file) into this run; returns the saved dict."""
        if path.is_dir():
            path = path / TRAIN_STATE
        if not path.is_file():
            raise TrainError(f"--resume {path}: no such file; give a run folder holding {TRAIN_STATE}")
        state, _ = read_checkpoint(path)  # CheckpointError for a damaged file
        if not isinstance(state, dict) or state.get("command") != self.command:
            made_by = state.get("command") if isinstance(state, dict) else None
            raise TrainError(f"--resume {path} comes from `{made_by}`, not `{self.command}`")
        if "rng" not in state or "flags" not in state:
            raise TrainError(
                f"--resume {path} was written by an earlier python -m train, without the random "
                "generator states an exact continuation needs; start the run again"
            )
        changed = [key for key in self.flags if state["flags"].get(key) != self.flags[key]]
        if changed:
            was = ", ".join(_flag(key, state["flags"].get(key)) for key in changed)
            now = ", ".join(_flag(key, self.flags[key]) for key in changed)
            raise TrainError(
                f"--resume {path} trained a network with {was}; this run asks for {now}. "
                "Resume with that run's options, or train into another --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["sampler"])
        _set_rng_states(state["rng"])
        return state


def _flag(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return key if value else f"no {key}"
    if isinstance(value, list):
        return f"{key} {','.join(map(str, value))}"
    return f"{key} {value}"


def _rng_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's and every CUDA device's global generator state, as plain data."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: Mapping[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    key = numpy_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    cuda = list(states["cuda"])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) == here > 0:
        torch.cuda.set_rng_state_all(cuda)
    elif cuda or here:
        warn(
            f"the run saved {len(cuda)} CUDA generator states and this machine has {here} CUDA devices: "
            "random numbers drawn on the GPU (dropout) will differ from the uninterrupted run"
        )
