"""``python -m train classifier``: VGG16 transfer learning and fine-tuning (book-ssd.md 1.2-1.3).

The book's chapter 1 as a command: ``DATA/{train,val}/<class>/`` images, ``transfer`` (only the new
head learns) or ``finetune`` (every layer, three learning rates), starting from torchvision's
ImageNet VGG16 when it fits; validation runs the service's own preprocessing, so the reported
accuracy is what the served checkpoint gives. Epoch 0 only evaluates (the untrained head).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision import transforms
from torchvision.datasets import ImageFolder

from models.checkpoints import read_state_dict
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, ClassifierTransform
from models.vgg import VGG, VGG_BUILDERS
from train import loop
from train.common import plain_config, say, seed_everything, training_device, warn, width_label
from train.errors import TrainError

__all__ = [
    "IMAGENET_VGG16",
    "ClassifierConfig",
    "build_classifier",
    "classifier_step",
    "describe_run",
    "load_folders",
    "make_optimizer",
    "train_classifier",
    "train_transform",
]

Mode = Literal["transfer", "finetune"]
COMMAND = "python -m train classifier"
#: torchvision's ImageNet VGG16, where ``weights/download.py`` puts it
IMAGENET_VGG16 = Path(__file__).resolve().parents[1] / "weights" / "vgg16-397923af.pth"
_IMAGENET_VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
_HEAD = "classifier.6."
_HIDDEN = ("classifier.0.", "classifier.3.")


@dataclass
class ClassifierConfig:
    """Everything a run depends on (the command's options)."""

    data: Path
    out: Path
    mode: Mode = "finetune"
    arch: str = "vgg16"
    width: float = 1.0
    epochs: int = 2
    batch_size: int = 32
    workers: int = 0
    size: int = 224  # RandomResizedCrop size and validation centre crop
    resize: int | None = None  # validation shorter side (default: size, as the book)
    lr_features: float = 1e-4
    lr_classifier: float = 5e-4
    lr_head: float = 1e-3
    momentum: float = 0.9
    seed: int = 1234
    device: str = "auto"
    pretrained: Path | None = IMAGENET_VGG16
    resume: Path | None = None
    state_dict: bool = False
    progress: bool = True


def train_transform(size: int) -> transforms.Compose:
    """The book's ``ImageTransform('train')``: RandomResizedCrop(size, scale 0.5-1), flip, normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_folders(data: Path, size: int, resize: int) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) datasets of ``data/train`` and ``data/val``; both must have the same classes."""
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise TrainError(f"{data / split} is not a folder; expected {data}/{{train,val}}/<class>/*.jpg")
    train = ImageFolder(str(data / "train"), transform=train_transform(size))
    val = ImageFolder(str(data / "val"), transform=ClassifierTransform(resize, size))
    if train.classes != val.classes:
        raise TrainError(
            f"{data}: train has classes {train.classes}, val has {val.classes}; "
            "give both the same class folders"
        )
    if len(train.classes) < 2:
        raise TrainError(f"{data / 'train'} has {len(train.classes)} class folder(s); need at least 2")
    return train, val


def build_classifier(
    arch: str, num_classes: int, width: float = 1.0, pretrained: Path | None = IMAGENET_VGG16
) -> tuple[VGG, str]:
    """A VGG16 with a new ``num_classes`` head -> (model, where its other weights came from).

    Loads ``pretrained`` (torchvision's ImageNet file, SHA-256 checked) when it exists, the arch is
    vgg16 and ``width`` is 1; otherwise the network keeps its random init and a warning says so.
    """
    if arch not in VGG_BUILDERS:
        raise TrainError(f"--arch {arch!r}: use one of {', '.join(VGG_BUILDERS)}")
    usable = pretrained is not None and pretrained.is_file() and arch == "vgg16" and width == 1.0
    if not usable:
        why = (
            "--pretrained none"
            if pretrained is None
            else f"the network is {arch} at width {width:g}, and ImageNet weights fit vgg16 at width 1"
            if pretrained.is_file()
            else f"{pretrained} is not there (python weights/download.py vgg16-imagenet fetches it)"
        )
        warn(
            f"no ImageNet weights ({why}): every layer starts from random weights. Transfer learning "
            "on random features learns little; fine-tuning from scratch needs much more data and epochs"
        )
        model = VGG_BUILDERS[arch](num_classes=num_classes, width=width)
        # torchvision's N(0, 0.01) for the hidden linears suits 4096-wide layers (gain ~0.6 each); at
        # width 1/16 (256 wide) it shrinks the signal ~100x through fc6-fc7 and nothing learns. He init
        # keeps it; the head stays small.
        for index in (0, 3):
            layer = model.classifier[index]
            assert isinstance(layer, nn.Linear)
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        return model, "scratch"
    assert pretrained is not None
    model = VGG_BUILDERS[arch](num_classes=1000, width=1.0)
    sha = _IMAGENET_VGG16_SHA256 if pretrained.name == IMAGENET_VGG16.name else None
    model.load_state_dict(read_state_dict(pretrained, expected_sha256=sha))
    head = model.classifier[6]
    assert isinstance(head, nn.Linear)
    model.classifier[6] = nn.Linear(head.in_features, num_classes)  # the book's net.classifier[6] = ...
    return model, f"imagenet:{pretrained.name}"


def make_optimizer(
    model: nn.Module,
    mode: Mode,
    lr_features: float = 1e-4,
    lr_classifier: float = 5e-4,
    lr_head: float = 1e-3,
    momentum: float = 0.9,
) -> torch.optim.SGD:
    """Set ``requires_grad`` for ``mode`` and return its SGD.

    transfer: only ``classifier.6.*`` learn (lr ``lr_head``); finetune: three groups, ``features.*``
    (``lr_features``), ``classifier.0/3.*`` (``lr_classifier``), ``classifier.6.*`` (``lr_head``).
    """
    groups: dict[str, list[nn.Parameter]] = {"features": [], "classifier": [], "head": []}
    for name, param in model.named_parameters():
        if name.startswith(_HEAD):
            groups["head"].append(param)
        elif name.startswith(_HIDDEN):
            groups["classifier"].append(param)
        elif name.startswith("features."):
            groups["features"].append(param)
        else:
            raise ValueError(f"parameter {name!r} is in no group; is this a VGG16?")
        param.requires_grad_(mode == "finetune" or name.startswith(_HEAD))
    if mode == "transfer":
        return torch.optim.SGD(groups["head"], lr=lr_head, momentum=momentum)
    return torch.optim.SGD(
        [
            {"params": groups["features"], "lr": lr_features},
            {"params": groups["classifier"], "lr": lr_classifier},
            {"params": groups["head"], "lr": lr_head},
        ],
        momentum=momentum,
    )


def classifier_step(model: nn.Module, device: torch.device) -> loop.Step:
    """The step :func:`train.loop.run_epoch` takes: cross-entropy of a batch (images, labels) and
    its accuracy (``acc``)."""
    criterion = nn.CrossEntropyLoss()

    def step(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int, dict[str, float]]:
        inputs, labels = batch[0].to(device), batch[1].to(device)
        outputs = model(inputs)
        accuracy = float((outputs.argmax(dim=1) == labels).float().mean().item())
        return criterion(outputs, labels), inputs.shape[0], {"acc": accuracy}

    return step


def describe_run(
    cfg: ClassifierConfig, classes: Sequence[str]
) -> tuple[loop.CheckpointFormat, dict[str, Any]]:
    """What the checkpoints say besides the weights: their format, and the metadata of every epoch."""
    form = loop.CheckpointFormat(
        task="classify",
        arch=cfg.arch,
        labels=classes,
        preprocess={"kind": "classifier", "resize": cfg.resize or cfg.size, "crop": cfg.size},
        state_dict=cfg.state_dict,
    )
    about = {
        "trainer": COMMAND,
        "variant": f"{cfg.arch.upper().replace('_', '-')} width {width_label(cfg.width)}",
        "width": cfg.width,
        "mode": cfg.mode,
        "data": str(cfg.data),
        "seed": cfg.seed,
        "train_augmentation": f"RandomResizedCrop({cfg.size}, scale=(0.5, 1.0)), RandomHorizontalFlip",
    }
    return form, about


def train_classifier(cfg: ClassifierConfig) -> dict[str, Any]:
    """Run the whole command; returns a summary (best / last paths, accuracies, history).

    Writes ``best.pth`` (highest val accuracy, then lowest loss) and ``last.pth`` in the project
    format, ``train_state.pth`` for ``--resume`` and ``history.json``; ``--state-dict`` also writes
    the book's plain ``*_state_dict.pth``.
    """
    seed_everything(cfg.seed)
    device = training_device(cfg.device)
    train_set, val_set = load_folders(cfg.data, cfg.size, cfg.resize or cfg.size)
    classes = list(train_set.classes)
    say(f"{cfg.data}: {len(train_set)} train / {len(val_set)} val images, classes {classes}")
    model, init = build_classifier(cfg.arch, len(classes), cfg.width, cfg.pretrained)
    model.to(device)
    optimizer = make_optimizer(model, cfg.mode, cfg.lr_features, cfg.lr_classifier, cfg.lr_head, cfg.momentum)
    train_loader = loop.make_loader(
        train_set, cfg.batch_size, cfg.workers, device, shuffle=True, seed=cfg.seed
    )
    val_loader = loop.make_loader(val_set, cfg.batch_size, cfg.workers, device)
    flags = {"--arch": cfg.arch, "--width": cfg.width, "--mode": cfg.mode, "classes": classes}
    run = loop.RunState(COMMAND, flags, plain_config(cfg), model, optimizer, train_loader)
    history: list[dict[str, Any]] = []
    start_epoch, best_acc, best_loss = 0, -1.0, float("inf")
    if cfg.resume is not None:
        saved = run.restore(cfg.resume)
        start_epoch, history = int(saved["epoch"]) + 1, list(saved["history"])
        best_acc, best_loss, init = float(saved["best_acc"]), float(saved["best_loss"]), str(saved["init"])
        say(f"resuming after epoch {start_epoch - 1} from {cfg.resume}")

    cfg.out.mkdir(parents=True, exist_ok=True)
    form, about = describe_run(cfg, classes)
    say(f"{about['variant']}, {cfg.mode}, init {init}, on {device}; {cfg.epochs} epochs (0 only evaluates)")
    step = classifier_step(model, device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch}
        train_part = ""
        if epoch > 0:  # epoch 0 measures the starting point (the book's train_model)
            losses = loop.run_epoch(
                model, train_loader, step, optimizer, show=cfg.progress, desc=f"epoch {epoch} train"
            )
            record |= loop.prefixed("train", losses)
            train_part = f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
        losses = loop.run_epoch(model, val_loader, step, show=cfg.progress, desc=f"epoch {epoch} val")
        record |= loop.prefixed("val", losses)
        record["seconds"] = round(time.perf_counter() - started, 2)
        history.append(record)
        say(
            f"epoch {epoch}/{cfg.epochs}  {train_part}val loss {record['val_loss']:.4f} "
            f"acc {record['val_acc']:.3f}  ({record['seconds']:.1f} s)"
        )
        metadata = {
            **about,
            "init": init,
            "epoch": epoch,
            "val_accuracy": record["val_acc"],
            "val_loss": record["val_loss"],
            "history": history,
        }
        improved = (record["val_acc"], -record["val_loss"]) > (best_acc, -best_loss)
        if improved:
            best_acc, best_loss = record["val_acc"], record["val_loss"]
        progress = {"epoch": epoch, "best_acc": best_acc, "best_loss": best_loss, "init": init}
        loop.end_epoch(run, cfg.out, model, form, metadata, history, improved, progress)
    best = cfg.out / "best.pth"
    entry = loop.serve_entry(best, cfg.out.name or "my-classifier", "classify", cfg.arch)
    say(f"best val accuracy {best_acc:.3f}: {best}\n{entry}")
    return {
        "best": best,
        "last": cfg.out / "last.pth",
        "best_accuracy": best_acc,
        "history": history,
        "classes": classes,
        "init": init,
    }
