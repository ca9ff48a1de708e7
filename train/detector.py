"""``python -m train detector``: SSD300 / SSD512 training on a PASCAL VOC folder (book-ssd.md 2.9).

The book's chapter 2 as a command: its augmentations, ``MultiBoxLoss``, SGD with gradient
clipping, and a VGG base from ``vgg16_reducedfc.pth``, from a trained VGG16 classifier or random
(then ``--batchnorm`` helps, folded into the convs in every file written). Validation runs the
service's own post-processing and scores it with the ``--metric`` of ``python -m train evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from models.anchors import default_boxes
from models.checkpoints import detect_layout, read_checkpoint, unwrap_state_dict
from models.detect import BOOK_POSTPROCESS, postprocess
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, SSD_PIXEL_MEAN_RGB
from models.ssd import SSD, SSD300_VOC, SSD512_VOC
from train import loop
from train.batchnorm import ConvBN, add_batchnorm, fold_batchnorm, has_batchnorm
from train.common import plain_config, say, seed_everything, training_device, warn, width_label
from train.errors import TrainError
from train.metrics import DETECTION_PARAMS, METRIC_TITLES, DetectionResults, Metric
from train.multibox import MultiBoxLoss
from train.voc import VOCDetection, collate, read_labels

__all__ = [
    "DetectorConfig",
    "base_from_classifier",
    "build_detector",
    "describe_run",
    "detector_step",
    "evaluate_detector",
    "load_splits",
    "lr_factor",
    "optimization",
    "train_detector",
    "train_one_epoch",
    "training_network",
    "validate",
]

COMMAND = "python -m train detector"
_CONFIGS = {"ssd300": SSD300_VOC, "ssd512": SSD512_VOC}
#: spread of the 0-255 pixels minus the mean; the first conv of a from-scratch base is scaled by its
#: inverse so that activations start near unit variance (He init assumes unit-variance inputs)
_PIXEL_SPREAD = 64.0


@dataclass
class DetectorConfig:
    """Everything a run depends on (the command's options)."""

    data: Path
    out: Path
    arch: str = "ssd300"
    width: float = 1.0
    epochs: int = 50
    batch_size: int = 32
    workers: int = 0
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip: float | None = 2.0  # clip_grad_value_; None = no clipping
    warmup_iters: int = 0
    lr_steps: tuple[int, ...] = ()  # epochs after which lr is multiplied by 0.1
    val_every: int = 10
    metric: Metric = "voc07"  # what validation reports and best.pth is chosen by
    base: Path | None = None
    base_classifier: Path | None = None  # conv1_1 .. conv5_3 from a trained VGG16 classifier
    labels: Path | None = None
    augment: bool = True
    batchnorm: bool = False  # train with BatchNorm after each base / extra conv, folded when saved
    seed: int = 1234
    device: str = "auto"
    resume: Path | None = None
    state_dict: bool = False
    progress: bool = True
    train_split: str = "train"
    val_split: str = "val"


# ----------------------------------------------------------------------------------------- model


def _he_init(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def build_detector(
    arch: str, num_classes: int, width: float = 1.0, base: Path | None = None, quiet: bool = False
) -> SSD:
    """An SSD for ``num_classes`` (background included) at ``width``.

    ``base``: a ``vgg16_reducedfc.pth``-layout file (keys ``0.weight`` .. ``33.bias``, the SSD's VGG
    base) loaded into ``net.vgg`` strictly; without it the base is He-initialised with its first
    conv scaled for 0-255 inputs, and a warning says the base trains from scratch.
    """
    if arch not in _CONFIGS:
        raise TrainError(f"--arch {arch!r}: use ssd300 or ssd512")
    net = SSD(num_classes, _CONFIGS[arch], width)
    _he_init([net.extras, net.loc, net.conf])
    if base is None:
        if not quiet:
            warn(
                "no --base (vgg16_reducedfc.pth): the VGG base trains from random weights; expect a much "
                "longer run than the book's 50 epochs from ImageNet features (--batchnorm helps)"
            )
        _he_init([net.vgg])
        first = net.vgg[0]
        assert isinstance(first, nn.Conv2d)
        with torch.no_grad():
            first.weight.div_(_PIXEL_SPREAD)
        return net
    obj, _ = read_checkpoint(base)
    if detect_layout(obj) not in ("ssd-vgg-base", "unknown"):
        raise TrainError(
            f"--base {base} is a {detect_layout(obj)} checkpoint, not the SSD's VGG base "
            "(vgg16_reducedfc.pth: keys 0.weight .. 33.bias)"
        )
    state = unwrap_state_dict(obj, base)
    try:
        net.vgg.load_state_dict(state)
    except RuntimeError as e:
        raise TrainError(
            f"--base {base} does not fit the VGG base of an {arch} at width {width:g}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return net


def base_from_classifier(net: SSD, path: Path) -> str:
    """Load conv1_1 .. conv5_3 of ``net.vgg`` from a trained VGG16 / VGG16-BN classifier at the same
    width (the book starts from ImageNet VGG16; this starts from any classifier the service loads).

    The classifier saw ImageNet-normalised [0, 1] inputs and the SSD sees 0-255 pixels minus
    ``SSD_PIXEL_MEAN_RGB``: the first conv is rescaled per input channel (and its bias shifted) so
    it computes the same function away from the borders. A classifier's BatchNorm goes into the
    SSD's ConvBN modules when ``net`` has them (``--batchnorm``), else it is folded into the conv.
    conv6, conv7, the extras and the heads keep their random init. Returns a description.
    """
    obj, _ = read_checkpoint(path)
    layout = detect_layout(obj)
    if layout not in ("project", "vgg", "vgg_bn"):
        raise TrainError(f"--base-classifier {path} is not a VGG16 classifier ({layout} checkpoint)")
    arch = str(obj["arch"]) if layout == "project" else ("vgg16_bn" if layout == "vgg_bn" else "vgg16")
    if not arch.startswith("vgg"):
        raise TrainError(f"--base-classifier {path} holds a {arch}, not a VGG16 classifier")
    state = unwrap_state_dict(obj, path)
    convs = sorted(
        {
            int(k.split(".")[1])
            for k in state
            if k.startswith("features.") and k.endswith(".weight") and state[k].dim() == 4
        }
    )
    if len(convs) != 13:
        raise TrainError(f"--base-classifier {path} has {len(convs)} conv layers, not VGG16's 13")
    targets = [m for m in net.vgg if isinstance(m, nn.Conv2d | ConvBN)][:13]
    first = state[f"features.{convs[0]}.weight"]
    expected = targets[0].conv.out_channels if isinstance(targets[0], ConvBN) else targets[0].out_channels
    if first.shape[0] != expected:
        raise TrainError(
            f"--base-classifier {path} is {first.shape[0] / 64:g} wide, the SSD "
            f"{net.width:g}; give --width {first.shape[0] / 64:g}"
        )
    mean = torch.tensor(IMAGENET_MEAN)
    std = torch.tensor(IMAGENET_STD)
    pixel_mean = torch.tensor(SSD_PIXEL_MEAN_RGB)
    with torch.no_grad():
        for k, (index, target) in enumerate(zip(convs, targets, strict=True)):
            weight = state[f"features.{index}.weight"].float().clone()
            bias = state[f"features.{index}.bias"].float().clone()
            if k == 0:  # x_cls = x_ssd / (255 std) + (pixel_mean / 255 - mean) / std, per channel
                shift = (pixel_mean / 255 - mean) / std
                bias += (weight.sum(dim=(2, 3)) * shift).sum(dim=1)
                weight /= (255 * std)[None, :, None, None]
            bn_prefix = f"features.{index + 1}."
            bn = {
                name: state[bn_prefix + name]
                for name in ("weight", "bias", "running_mean", "running_var")
                if bn_prefix + name in state
            }
            conv = target.conv if isinstance(target, ConvBN) else target
            if len(bn) == 4 and isinstance(target, ConvBN):
                for name, value in bn.items():
                    getattr(target.bn, name).copy_(value)
            elif len(bn) == 4:  # fold: w * g / sqrt(v + eps), (b - m) * g / sqrt(v + eps) + beta
                scale = bn["weight"] / torch.sqrt(bn["running_var"] + 1e-5)
                weight *= scale[:, None, None, None]
                bias = (bias - bn["running_mean"]) * scale + bn["bias"]
            conv.weight.copy_(weight)
            assert conv.bias is not None
            conv.bias.copy_(bias)
    return f"conv1_1..conv5_3 from {arch} {path.name}"


# ----------------------------------------------------------------------------------------- steps


def detector_step(
    model: SSD,
    criterion: MultiBoxLoss,
    device: torch.device,
    results: DetectionResults | None = None,
    dataset: VOCDetection | None = None,
) -> loop.Step:
    """The step :func:`train.loop.run_epoch` takes: ``MultiBoxLoss`` of a batch (images, targets,
    sizes), reported as ``loss_loc`` and ``loss_conf`` too. With ``results``, the batch's detections
    (``DETECTION_PARAMS``, the service's post-processing in pixels of the original images) go into
    it, matched in order to ``dataset.truths`` (so the loader must not shuffle)."""
    priors = default_boxes(model.config).to(device)

    def step(
        batch: tuple[Tensor, list[Tensor], list[tuple[int, int]]],
    ) -> tuple[Tensor, int, dict[str, float]]:
        images, targets, sizes = batch
        loc, conf = model(images.to(device))
        loss_l, loss_c = criterion(loc, conf, targets)
        if results is not None and dataset is not None:
            params = [DETECTION_PARAMS] * len(sizes)
            found = postprocess(loc, conf, priors, sizes, params, BOOK_POSTPROCESS, 1, model.config.variances)
            for output in found:
                results.add(output, dataset.truths[len(results.found)])
        parts = {"loss_loc": float(loss_l.item()), "loss_conf": float(loss_c.item())}
        return loss_l + loss_c, images.shape[0], parts

    return step


def evaluate_detector(
    model: SSD,
    loader: DataLoader[Any],
    criterion: MultiBoxLoss,
    device: torch.device,
    labels: Sequence[str],
    show: bool = False,
    desc: str = "val",
) -> tuple[dict[str, float], DetectionResults]:
    """Validation losses of ``model`` over ``loader`` (an unshuffled :class:`VOCDetection`, no
    augmentation) and its detections against the split's annotations, to be scored by a metric."""
    dataset = loader.dataset
    if not isinstance(dataset, VOCDetection):
        raise TypeError(f"evaluate_detector needs a loader over a VOCDetection, not {type(dataset).__name__}")
    results = DetectionResults(labels)
    step = detector_step(model, criterion, device, results, dataset)
    return loop.run_epoch(model, loader, step, show=show, desc=desc), results


def lr_factor(cfg: DetectorConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of step k (0-based, one a batch) as a multiple of ``cfg.lr``: 0.1 for each
    of ``cfg.lr_steps`` that the step's epoch is past, times the linear warm-up
    (k + 1) / ``warmup_iters`` over the first ``warmup_iters`` steps."""

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch + 1
        warm = (step + 1) / cfg.warmup_iters if step < cfg.warmup_iters else 1.0
        return float(0.1 ** sum(epoch > s for s in cfg.lr_steps) * warm)

    return factor


# ----------------------------------------------------------------------------------------- the command


def load_splits(cfg: DetectorConfig, labels: Sequence[str]) -> tuple[VOCDetection, VOCDetection]:
    """The training split (augmented unless ``--no-augment``, images without a usable object left
    out) and the validation split of ``cfg.data``."""
    size = _CONFIGS[cfg.arch].input_size
    train_set = VOCDetection(cfg.data, cfg.train_split, labels, size, cfg.augment, cfg.seed, drop_empty=True)
    val_set = VOCDetection(cfg.data, cfg.val_split, labels, size)
    if len(train_set) == 0:
        raise TrainError(f"{cfg.data}: the {cfg.train_split} split has no image with a usable object")
    if len(val_set) == 0:
        raise TrainError(f"{cfg.data}: the {cfg.val_split} split lists no image to validate on")
    dropped = f" ({train_set.dropped} without usable objects left out)" if train_set.dropped else ""
    say(f"{cfg.data}: {len(train_set)} train{dropped} / {len(val_set)} val images, {len(labels)} classes")
    return train_set, val_set


def training_network(cfg: DetectorConfig, num_labels: int) -> tuple[SSD, str]:
    """The SSD to train (with BatchNorm for ``--batchnorm``) and where its base came from."""
    if cfg.base is not None and cfg.base_classifier is not None:
        raise TrainError("give --base or --base-classifier, not both")
    model = build_detector(
        cfg.arch, num_labels + 1, cfg.width, cfg.base, quiet=cfg.base_classifier is not None
    )
    if cfg.batchnorm:
        model = add_batchnorm(model)
    if cfg.base_classifier is not None:
        return model, base_from_classifier(model, cfg.base_classifier)
    return model, str(cfg.base or "random")


def validate(
    cfg: DetectorConfig,
    model: SSD,
    loader: DataLoader[Any],
    criterion: MultiBoxLoss,
    device: torch.device,
    labels: Sequence[str],
    epoch: int,
) -> dict[str, Any]:
    """Validation losses and ``cfg.metric`` as history entries (``map``, ``ap_per_class``, ...)."""
    losses, results = evaluate_detector(
        model, loader, criterion, device, labels, cfg.progress, f"epoch {epoch} val"
    )
    score = results.score(cfg.metric)
    return {
        **loop.prefixed("val", losses),
        "metric": score.metric,
        "map": score.map,
        "ap_per_class": score.per_class,
        **score.extra,
    }


def optimization(cfg: DetectorConfig, model: SSD, steps_per_epoch: int) -> tuple[torch.optim.SGD, LambdaLR]:
    """SGD with momentum and weight decay, and its learning-rate schedule (:func:`lr_factor`,
    one scheduler step per batch)."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return optimizer, LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def describe_run(
    cfg: DetectorConfig, model: SSD, labels: Sequence[str], base: str
) -> tuple[loop.CheckpointFormat, dict[str, Any]]:
    """What the checkpoints say besides the weights: their format, and the metadata of every epoch."""
    form = loop.CheckpointFormat(
        task="detect",
        arch=cfg.arch,
        labels=labels,
        preprocess={"kind": "ssd", "size": model.config.input_size},
        postprocess={"semantics": "book"},
        state_dict=cfg.state_dict,
    )
    batchnorm = "trained with BatchNorm after each base and extra conv, folded into the convs"
    about = {
        "trainer": COMMAND,
        "variant": f"{cfg.arch.upper()} width {width_label(cfg.width)}",
        "width": cfg.width,
        "base": base,
        "data": str(cfg.data),
        "seed": cfg.seed,
        "augment": cfg.augment,
        "batchnorm": batchnorm if cfg.batchnorm else "none",
    }
    return form, about


def train_one_epoch(
    cfg: DetectorConfig,
    epoch: int,
    model: SSD,
    loader: DataLoader[Any],
    step: loop.Step,
    optimizer: torch.optim.SGD,
    scheduler: LambdaLR,
) -> dict[str, Any]:
    """One training pass as a history entry: the losses and the last step's learning rate."""
    dataset = loader.dataset
    if isinstance(dataset, VOCDetection):
        dataset.set_epoch(epoch)  # the augmentation's generator is seeded by (seed, epoch, index)
    desc, hint = f"epoch {epoch} train", "lower --lr or add --warmup-iters"
    losses = loop.run_epoch(
        model,
        loader,
        step,
        optimizer,
        scheduler=scheduler,
        clip=cfg.clip,
        show=cfg.progress,
        desc=desc,
        diverged=hint,
    )
    last_lr = cfg.lr * lr_factor(cfg, len(loader))(scheduler.last_epoch - 1)  # the last step's
    return {"epoch": epoch, **loop.prefixed("train", losses), "lr": last_lr}


def train_detector(cfg: DetectorConfig) -> dict[str, Any]:
    """Run the whole command; returns a summary (best / last paths, the best score, history).

    Writes ``best.pth`` (best validation ``cfg.metric``) and ``last.pth`` in the project format the
    service loads as they are, ``train_state.pth`` for ``--resume`` and ``history.json``;
    ``--state-dict`` also writes the book's plain state_dict (``format = "ssd.pytorch"``).
    """
    seed_everything(cfg.seed)
    device = training_device(cfg.device)
    labels = read_labels(cfg.data, cfg.labels)
    if cfg.arch not in _CONFIGS:
        raise TrainError(f"--arch {cfg.arch!r}: use ssd300 or ssd512")
    train_set, val_set = load_splits(cfg, labels)
    model, base = training_network(cfg, len(labels))
    model = model.to(device)
    criterion = MultiBoxLoss(default_boxes(model.config)).to(device)
    drop_last = len(train_set) > cfg.batch_size
    train_loader = loop.make_loader(
        train_set,
        cfg.batch_size,
        cfg.workers,
        device,
        shuffle=True,
        seed=cfg.seed,
        drop_last=drop_last,
        collate_fn=collate,
    )
    val_loader = loop.make_loader(val_set, cfg.batch_size, cfg.workers, device, collate_fn=collate)
    optimizer, scheduler = optimization(cfg, model, len(train_loader))
    flags = {"--arch": cfg.arch, "--width": cfg.width, "--batchnorm": cfg.batchnorm, "labels": labels}
    run = loop.RunState(COMMAND, flags, plain_config(cfg), model, optimizer, train_loader, scheduler)
    history: list[dict[str, Any]] = []
    start_epoch, best_map = 1, -1.0
    if cfg.resume is not None:
        saved = run.restore(cfg.resume)
        start_epoch, history = int(saved["epoch"]) + 1, list(saved["history"])
        best_map, base = float(saved["best_map"]), str(saved["base"])
        say(f"resuming after epoch {start_epoch - 1} from {cfg.resume}")

    cfg.out.mkdir(parents=True, exist_ok=True)
    form, about = describe_run(cfg, model, labels, base)
    title = METRIC_TITLES[cfg.metric]
    batchnorm = " (+BatchNorm while training)" if cfg.batchnorm else ""
    say(
        f"{about['variant']}{batchnorm}, base {base}, on {device}; "
        f"{cfg.epochs} epochs, validation ({title}) every {cfg.val_every} and after the last"
    )
    step = detector_step(model, criterion, device)
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        record = train_one_epoch(cfg, epoch, model, train_loader, step, optimizer, scheduler)
        line = (
            f"epoch {epoch}/{cfg.epochs}  train loss {record['train_loss']:.4f} "
            f"(loc {record['train_loss_loc']:.4f}, conf {record['train_loss_conf']:.4f})"
        )
        metadata = {**about, "epoch": epoch, "history": history}
        validated = epoch % cfg.val_every == 0 or epoch == cfg.epochs
        if validated:
            record |= validate(cfg, model, val_loader, criterion, device, labels, epoch)
            line += f" | val loss {record['val_loss']:.4f} {title} {record['map']:.3f}"
            metadata |= {"val_metric": record["metric"], "val_map": record["map"]}
        record["seconds"] = round(time.perf_counter() - started, 2)
        history.append(record)
        say(f"{line}  ({record['seconds']:.1f} s)")
        improved = validated and record["map"] > best_map
        best_map = record["map"] if improved else best_map
        served = fold_batchnorm(model) if has_batchnorm(model) else model
        progress = {"epoch": epoch, "best_map": best_map, "base": base}
        loop.end_epoch(run, cfg.out, served, form, metadata, history, improved, progress)
    best = cfg.out / "best.pth"
    say(f"best {title} {best_map:.3f}: {best}\n" + loop.serve_entry(best, "my-detector", "detect", cfg.arch))
    return {
        "best": best,
        "last": cfg.out / "last.pth",
        "metric": cfg.metric,
        "best_map": best_map,
        "history": history,
        "labels": labels,
    }
