"""``python -m train classifier``: VGG16 transfer learning and fine-tuning (book-ssd.md 1.2-1.3).

The book's chapter 1 flow as a command:

- data: ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` (any image type PIL reads),
  classes in sorted folder order (torchvision ``ImageFolder``);
- training images: ``RandomResizedCrop(size, scale=(0.5, 1.0))``, horizontal flip, ImageNet
  normalisation (the book's ``ImageTransform('train')``); validation images: the service's own
  ``models.preprocess.ClassifierTransform(resize, crop)``, so the reported accuracy is what the
  served checkpoint gives;
- ``transfer``: only the new head ``classifier.6`` learns (every other parameter has
  ``requires_grad=False``); ``finetune``: every layer learns, with one learning rate for
  ``features``, one for ``classifier.0`` / ``classifier.3`` and one for the head (1e-4, 5e-4, 1e-3);
  SGD with momentum 0.9, no weight decay, cross-entropy;
- epoch 0 only evaluates (the untrained head's accuracy), then each epoch trains and evaluates;
  the epoch loss is the sum of (mean batch loss x batch size) over the set, divided by its size;
- output folder: ``best.pth`` (highest val accuracy) and ``last.pth`` in the project format the
  service loads as they are (``format = "project"``), ``train_state.pth`` for ``--resume``,
  ``history.json``; ``--state-dict`` also writes the book's plain ``*_state_dict.pth``.

Start point: torchvision's ImageNet VGG16 (``weights/vgg16-397923af.pth``, fetched by
``weights/download.py``) when it is there and the network is full width; otherwise random
weights, with a warning (transfer learning on random features learns little).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from models.checkpoints import read_state_dict, save_project_checkpoint
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, ClassifierTransform
from models.vgg import VGG, VGG_BUILDERS
from train.common import (
    load_train_state,
    plain_config,
    progress,
    resolve_device,
    save_state_dict,
    save_train_state,
    say,
    seed_everything,
    warn,
    width_label,
    write_history,
)

__all__ = [
    "IMAGENET_VGG16",
    "ClassifierConfig",
    "build_classifier",
    "load_folders",
    "make_optimizer",
    "run_epoch",
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
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_folders(data: Path, size: int, resize: int) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) datasets of ``data/train`` and ``data/val``; both must have the same classes."""
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise SystemExit(f"error: {data / split} is not a folder; "
                             f"expected {data}/{{train,val}}/<class>/*.jpg")
    train = ImageFolder(str(data / "train"), transform=train_transform(size))
    val = ImageFolder(str(data / "val"), transform=ClassifierTransform(resize, size))
    if train.classes != val.classes:
        raise SystemExit(f"error: {data}: train has classes {train.classes}, val has {val.classes}; "
                         "give both the same class folders")
    if len(train.classes) < 2:
        raise SystemExit(f"error: {data / 'train'} has {len(train.classes)} class folder(s); need at least 2")
    return train, val


def build_classifier(arch: str, num_classes: int, width: float = 1.0,
                     pretrained: Path | None = IMAGENET_VGG16) -> tuple[VGG, str]:
    """A VGG16 with a new ``num_classes`` head -> (model, where its other weights came from).

    Loads ``pretrained`` (torchvision's ImageNet file, SHA-256 checked) when it exists, the arch is
    vgg16 and ``width`` is 1; otherwise the network keeps its random init and a warning says so.
    """
    if arch not in VGG_BUILDERS:
        raise SystemExit(f"error: --arch {arch!r}: use one of {', '.join(VGG_BUILDERS)}")
    usable = pretrained is not None and pretrained.is_file() and arch == "vgg16" and width == 1.0
    if not usable:
        why = ("--pretrained none" if pretrained is None
               else f"the network is {arch} at width {width:g}, and ImageNet weights fit vgg16 at width 1"
               if pretrained.is_file()
               else f"{pretrained} is not there (python weights/download.py vgg16-imagenet fetches it)")
        warn(f"no ImageNet weights ({why}): every layer starts from random weights. Transfer learning "
             "on random features learns little; fine-tuning from scratch needs much more data and epochs")
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


def make_optimizer(model: nn.Module, mode: Mode, lr_features: float = 1e-4, lr_classifier: float = 5e-4,
                   lr_head: float = 1e-3, momentum: float = 0.9) -> torch.optim.SGD:
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
    return torch.optim.SGD([
        {"params": groups["features"], "lr": lr_features},
        {"params": groups["classifier"], "lr": lr_classifier},
        {"params": groups["head"], "lr": lr_head},
    ], momentum=momentum)


def run_epoch(model: nn.Module, loader: DataLoader[tuple[Tensor, int]], criterion: nn.Module,
              device: torch.device, optimizer: torch.optim.Optimizer | None = None, show: bool = False,
              desc: str = "") -> tuple[float, float]:
    """One pass over ``loader``: trains when ``optimizer`` is given, else evaluates.
    Returns (mean loss per image, accuracy), the loss summed as loss x batch size."""
    training = optimizer is not None
    model.train(training)
    if training:  # frozen BatchNorm layers (transfer mode on vgg16_bn) keep their running statistics too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        bar = progress(loader, show, desc)
        for inputs, labels in bar:
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.item()) * inputs.shape[0]
            correct += int((outputs.argmax(dim=1) == labels).sum().item())
            seen += inputs.shape[0]
            bar.set_postfix_str(f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}", refresh=False)
    if seen == 0:
        raise SystemExit("error: an empty dataset split; put images in every class folder")
    return loss_sum / seen, correct / seen


def _save(cfg: ClassifierConfig, model: nn.Module, name: str, classes: Sequence[str], resize: int,
          metadata: dict[str, Any]) -> Path:
    path = save_project_checkpoint(
        cfg.out / f"{name}.pth", model, task="classify", arch=cfg.arch, labels=classes,
        preprocess={"kind": "classifier", "resize": resize, "crop": cfg.size}, metadata=metadata)
    if cfg.state_dict:  # the book's layout: torch.save(net.state_dict(), ...)
        save_state_dict(model, cfg.out / f"{name}_state_dict.pth")
    return path


def train_classifier(cfg: ClassifierConfig) -> dict[str, Any]:
    """Run the whole command; returns a summary (best / last paths, accuracies, history)."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    resize = cfg.resize or cfg.size
    train_set, val_set = load_folders(cfg.data, cfg.size, resize)
    classes = list(train_set.classes)
    say(f"{cfg.data}: {len(train_set)} train / {len(val_set)} val images, classes {classes}")
    model, init = build_classifier(cfg.arch, len(classes), cfg.width, cfg.pretrained)
    model.to(device)
    optimizer = make_optimizer(model, cfg.mode, cfg.lr_features, cfg.lr_classifier, cfg.lr_head, cfg.momentum)
    criterion = nn.CrossEntropyLoss()
    loader_args: dict[str, Any] = {"batch_size": cfg.batch_size, "num_workers": cfg.workers,
                                   "pin_memory": device.type == "cuda", "persistent_workers": cfg.workers > 0}
    train_loader = DataLoader(train_set, shuffle=True, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)

    history: list[dict[str, Any]] = []
    start_epoch, best_acc, best_loss = 0, -1.0, float("inf")
    if cfg.resume is not None:
        state = load_train_state(cfg.resume, COMMAND)
        if state["classes"] != classes or state["arch"] != cfg.arch or state["width"] != cfg.width:
            raise SystemExit(f"error: --resume {cfg.resume}: it trained {state['arch']} width "
                             f"{state['width']} on {state['classes']}; this run is {cfg.arch} width "
                             f"{cfg.width} on {classes}")
        if state["mode"] != cfg.mode:
            raise SystemExit(f"error: --resume {cfg.resume} was a {state['mode']} run; "
                             f"use --mode {state['mode']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        best_acc, best_loss, init = float(state["best_acc"]), float(state["best_loss"]), str(state["init"])
        say(f"resuming after epoch {start_epoch - 1} from {cfg.resume}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    variant = f"{cfg.arch.upper().replace('_', '-')} width {width_label(cfg.width)}"
    say(f"{variant}, {cfg.mode}, init {init}, on {device}; epochs {cfg.epochs} (epoch 0 only evaluates)")

    paths: dict[str, Path] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch}
        if epoch > 0:  # epoch 0 measures the starting point (the book's train_model)
            record["train_loss"], record["train_acc"] = run_epoch(
                model, train_loader, criterion, device, optimizer, cfg.progress, f"epoch {epoch} train")
        record["val_loss"], record["val_acc"] = run_epoch(
            model, val_loader, criterion, device, None, cfg.progress, f"epoch {epoch} val")
        record["seconds"] = round(time.perf_counter() - started, 2)
        history.append(record)
        train_part = (f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                      if epoch > 0 else "")
        say(f"epoch {epoch}/{cfg.epochs}  {train_part}val loss {record['val_loss']:.4f} "
            f"acc {record['val_acc']:.3f}  ({record['seconds']:.1f} s)")

        metadata = {
            "trainer": COMMAND, "variant": variant, "width": cfg.width, "mode": cfg.mode, "init": init,
            "data": str(cfg.data), "epoch": epoch, "val_accuracy": record["val_acc"],
            "val_loss": record["val_loss"], "seed": cfg.seed, "history": history,
            "train_augmentation": f"RandomResizedCrop({cfg.size}, scale=(0.5, 1.0)), RandomHorizontalFlip",
        }
        if (record["val_acc"], -record["val_loss"]) > (best_acc, -best_loss):
            best_acc, best_loss = record["val_acc"], record["val_loss"]
            paths["best"] = _save(cfg, model, "best", classes, resize, metadata)
        paths["last"] = _save(cfg, model, "last", classes, resize, metadata)
        save_train_state(cfg.out, {
            "command": COMMAND, "config": plain_config(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history, "best_acc": best_acc,
            "best_loss": best_loss, "classes": classes, "arch": cfg.arch, "width": cfg.width,
            "mode": cfg.mode, "init": init,
        })
        write_history(cfg.out, history)
    best = cfg.out / "best.pth"
    say(f"best val accuracy {best_acc:.3f}: {best}\nserve it with a models file entry:\n"
        f'[[models]]\nname = "{cfg.out.name or "my-classifier"}"\ntask = "classify"\narch = "{cfg.arch}"\n'
        f'format = "project"\nweights = "{best.resolve()}"')
    return {"best": best, "last": cfg.out / "last.pth", "best_accuracy": best_acc, "history": history,
            "classes": classes, "init": init}
