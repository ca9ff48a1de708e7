"""``python -m train detector``: SSD300 / SSD512 training on a PASCAL VOC folder (book-ssd.md 2.9).

- data: ``DATA/Annotations/<id>.xml``, ``DATA/JPEGImages/<id>.jpg``,
  ``DATA/ImageSets/Main/{train,val}.txt``; objects marked ``difficult`` are left out (the book's
  ``Anno_xml2list``); boxes become ``(coord - 1) / size`` as the book reads them. Class names come
  from ``--labels FILE`` (one a line), else ``DATA/labels.txt``, else the 20 VOC classes;
- training images: photometric distortion, expand, random sample crop, mirror (``train.augment``),
  then the service's own ``models.preprocess.SSDTransform`` (resize to 300 or 512, minus the pixel
  mean); validation images: ``SSDTransform`` only;
- network: ``models.ssd.SSD`` at ``--width``; the VGG base from ``--base`` (``vgg16_reducedfc.pth``
  layout, keys ``0.weight`` .. ``33.bias``) when given, else random; extras and heads get He-normal
  weights and zero biases (the book's init);
- ``--batchnorm``: train with BatchNorm after every base and extra conv (``train.batchnorm``), which
  a from-scratch base needs to learn in reasonable time; it is folded into the convs whenever a
  checkpoint is written, so the files are the plain SSD;
- loss: ``train.multibox.MultiBoxLoss`` (IoU 0.5 matching, 3:1 hard negatives, smooth L1 +
  cross-entropy over the number of positives); SGD lr 1e-3, momentum 0.9, weight decay 5e-4,
  ``clip_grad_value_`` 2.0 (the book's); optional linear warm-up and step decay;
- validation every ``--val-every`` epochs and after the last: the loss, and mAP through torchmetrics
  (``MeanAveragePrecision``, COCO evaluation: ``map_50`` = mAP at IoU 0.5, ``map`` = AP@[.5:.95])
  on the service's own post-processing (``models.detect.postprocess``, book semantics, boxes in
  pixels of the original image);
- output folder: ``best.pth`` (highest mAP@0.5) and ``last.pth`` in the project format the service
  loads as they are, ``train_state.pth`` for ``--resume``, ``history.json``; ``--state-dict`` also
  writes the book's plain state_dict (``format = "ssd.pytorch"``).
"""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.anchors import default_boxes
from models.checkpoints import detect_layout, read_checkpoint, save_project_checkpoint, unwrap_state_dict
from models.detect import BOOK_POSTPROCESS, postprocess
from models.labels import VOC_CLASSES
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, SSD_PIXEL_MEAN_RGB, SSDTransform
from models.ssd import SSD, SSD300_VOC, SSD512_VOC
from models.types import DetectParams
from train.augment import ssd_train_augment
from train.batchnorm import ConvBN, add_batchnorm, fold_batchnorm, has_batchnorm
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
from train.evaluate import DetectionMAP
from train.multibox import MultiBoxLoss

__all__ = [
    "Annotation",
    "DetectorConfig",
    "VOCDetection",
    "base_from_classifier",
    "build_detector",
    "collate",
    "evaluate_detector",
    "read_annotation",
    "read_labels",
    "train_detector",
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


# ----------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Annotation:
    """One image's objects: ``boxes`` float32[N, 4] [x1, y1, x2, y2] in pixels ((coord - 1), as the
    book), ``labels`` int64[N] 0-based without background, difficult objects left out."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def read_labels(data: Path, labels_file: Path | None) -> list[str]:
    """``labels_file``, else ``data/labels.txt``, else the 20 VOC classes (the book's order)."""
    path = labels_file or (data / "labels.txt")
    if labels_file is not None or path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise SystemExit(f"error: {path} lists no class names")
        return names
    return list(VOC_CLASSES)


def read_annotation(path: Path, labels: Sequence[str], keep_difficult: bool = False) -> Annotation:
    """Parse one VOC XML file (the book's ``Anno_xml2list``, without the normalisation)."""
    try:
        root = ET.parse(path).getroot()
        width = int(root.findtext("size/width", ""))
        height = int(root.findtext("size/height", ""))
    except (ET.ParseError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a VOC annotation with size/width and size/height ({e})"
                         ) from None
    boxes, classes = [], []
    for obj in root.iter("object"):
        if not keep_difficult and int(obj.findtext("difficult", "0") or 0) == 1:
            continue
        name = (obj.findtext("name") or "").lower().strip()
        if name not in labels:
            raise SystemExit(f"error: {path}: class {name!r} is not in the labels ({', '.join(labels)}); "
                             "give --labels FILE with every class name")
        box = obj.find("bndbox")
        if box is None:
            raise SystemExit(f"error: {path}: an object without bndbox")
        x1, y1, x2, y2 = (float(box.findtext(tag, "nan")) - 1 for tag in ("xmin", "ymin", "xmax", "ymax"))
        if not (x2 > x1 and y2 > y1):
            continue  # a degenerate box cannot be encoded (log of zero size)
        boxes.append((x1, y1, x2, y2))
        classes.append(labels.index(name))
    return Annotation(path.stem, width, height, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                      np.asarray(classes, dtype=np.int64))


class VOCDetection(Dataset[tuple[Tensor, Tensor, tuple[int, int]]]):
    """A VOC split: item i -> (image FloatTensor[3, S, S] from ``SSDTransform``, target
    FloatTensor[N, 5] of [x1, y1, x2, y2, label] normalised, (width, height) of the original).

    With ``augment``, training images go through ``ssd_train_augment`` with a generator seeded by
    (seed, epoch, index), so runs repeat whatever the number of loader workers; call
    :meth:`set_epoch` before each epoch. Training splits drop images with no usable object.
    """

    def __init__(self, root: Path, split: str, labels: Sequence[str], size: int, augment: bool = False,
                 seed: int = 0, drop_empty: bool = False) -> None:
        ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise SystemExit(f"error: {ids_file} is not there; expected a VOC folder "
                             "(Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt)")
        ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
        self.root = root
        self.annotations = [read_annotation(root / "Annotations" / f"{i}.xml", labels) for i in ids]
        if drop_empty:
            self.annotations = [a for a in self.annotations if len(a.boxes) > 0]
        self.dropped = len(ids) - len(self.annotations)
        self.transform = SSDTransform(size)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
        ann = self.annotations[index]
        with Image.open(self.root / "JPEGImages" / f"{ann.image_id}.jpg") as file:
            image = file.convert("RGB")
        original = image.size
        boxes, labels = ann.boxes, ann.labels
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pixels, boxes, labels = ssd_train_augment(np.asarray(image, dtype=np.float32), boxes, labels, rng)
            image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
        scale = np.array(image.size * 2, dtype=np.float32)  # (W, H, W, H)
        target = np.concatenate((boxes / scale, labels[:, None].astype(np.float32)), axis=1)
        return self.transform(image), torch.from_numpy(target.astype(np.float32)), original


def collate(batch: Sequence[tuple[Tensor, Tensor, tuple[int, int]]],
            ) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
    """The book's ``od_collate_fn``: stacked images, a list of per-image targets (and sizes)."""
    images, targets, sizes = zip(*batch, strict=True)
    return torch.stack(images), list(targets), list(sizes)


# ----------------------------------------------------------------------------------------- model


def _he_init(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def build_detector(arch: str, num_classes: int, width: float = 1.0, base: Path | None = None,
                   quiet: bool = False) -> SSD:
    """An SSD for ``num_classes`` (background included) at ``width``.

    ``base``: a ``vgg16_reducedfc.pth``-layout file (keys ``0.weight`` .. ``33.bias``, the SSD's VGG
    base) loaded into ``net.vgg`` strictly; without it the base is He-initialised with its first
    conv scaled for 0-255 inputs, and a warning says the base trains from scratch.
    """
    if arch not in _CONFIGS:
        raise SystemExit(f"error: --arch {arch!r}: use ssd300 or ssd512")
    net = SSD(num_classes, _CONFIGS[arch], width)
    _he_init([net.extras, net.loc, net.conf])
    if base is None:
        if not quiet:
            warn("no --base (vgg16_reducedfc.pth): the VGG base trains from random weights; expect a much "
                 "longer run than the book's 50 epochs from ImageNet features (--batchnorm helps)")
        _he_init([net.vgg])
        first = net.vgg[0]
        assert isinstance(first, nn.Conv2d)
        with torch.no_grad():
            first.weight.div_(_PIXEL_SPREAD)
        return net
    obj, _ = read_checkpoint(base)
    if detect_layout(obj) not in ("ssd-vgg-base", "unknown"):
        raise SystemExit(f"error: --base {base} is a {detect_layout(obj)} checkpoint, not the SSD's VGG base "
                         "(vgg16_reducedfc.pth: keys 0.weight .. 33.bias)")
    state = unwrap_state_dict(obj, base)
    try:
        net.vgg.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"error: --base {base} does not fit the VGG base of an {arch} at width {width:g}: "
                         f"{str(e).splitlines()[0]}") from None
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
        raise SystemExit(f"error: --base-classifier {path} is not a VGG16 classifier ({layout} checkpoint)")
    arch = str(obj["arch"]) if layout == "project" else ("vgg16_bn" if layout == "vgg_bn" else "vgg16")
    if not arch.startswith("vgg"):
        raise SystemExit(f"error: --base-classifier {path} holds a {arch}, not a VGG16 classifier")
    state = unwrap_state_dict(obj, path)
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight")
                    and state[k].dim() == 4})
    if len(convs) != 13:
        raise SystemExit(f"error: --base-classifier {path} has {len(convs)} conv layers, not VGG16's 13")
    targets = [m for m in net.vgg if isinstance(m, nn.Conv2d | ConvBN)][:13]
    first = state[f"features.{convs[0]}.weight"]
    expected = targets[0].conv.out_channels if isinstance(targets[0], ConvBN) else targets[0].out_channels
    if first.shape[0] != expected:
        raise SystemExit(f"error: --base-classifier {path} is {first.shape[0] / 64:g} wide, the SSD "
                         f"{net.width:g}; give --width {first.shape[0] / 64:g}")
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
            bn = {name: state[bn_prefix + name] for name in ("weight", "bias", "running_mean", "running_var")
                  if bn_prefix + name in state}
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


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_detector(model: SSD, loader: DataLoader[Any], criterion: MultiBoxLoss, device: torch.device,
                      show: bool = False, desc: str = "val") -> dict[str, Any]:
    """Validation loss and mAP of ``model`` over ``loader`` (no augmentation), with the service's
    post-processing (book semantics, score >= 0.01, up to 100 detections per image)."""
    model.eval()
    metric = DetectionMAP()
    priors = default_boxes(model.config).to(device)
    params = DetectParams(score_threshold=0.01, iou_threshold=None, max_detections=100)
    loss_sum, seen = 0.0, 0
    for images, targets, sizes in progress(loader, show, desc):
        loc, conf = model(images.to(device))
        loss_l, loss_c = criterion(loc, conf, targets)
        loss_sum += float((loss_l + loss_c).item()) * images.shape[0]
        seen += images.shape[0]
        outputs = postprocess(loc, conf, priors, sizes, [params] * len(sizes), BOOK_POSTPROCESS, 1,
                              model.config.variances)
        for output, target, (width, height) in zip(outputs, targets, sizes, strict=True):
            truth = target[:, :4] * torch.tensor([width, height, width, height], dtype=torch.float32)
            metric.add(output.boxes, output.scores, output.class_ids, truth, target[:, 4].long())
    result = metric.compute()
    result["val_loss"] = loss_sum / max(seen, 1)
    return result


# ----------------------------------------------------------------------------------------- training


def _lr_at(cfg: DetectorConfig, epoch: int, iteration: int) -> float:
    """``cfg.lr`` times the step decay for ``epoch`` (1-based) times the warm-up ramp."""
    lr = cfg.lr * 0.1 ** sum(epoch > step for step in cfg.lr_steps)
    if cfg.warmup_iters > 0 and iteration < cfg.warmup_iters:
        lr *= (iteration + 1) / cfg.warmup_iters
    return lr


def _save(cfg: DetectorConfig, model: SSD, name: str, labels: Sequence[str],
          metadata: dict[str, Any]) -> Path:
    if has_batchnorm(model):
        model = fold_batchnorm(model)
    path = save_project_checkpoint(
        cfg.out / f"{name}.pth", model, task="detect", arch=cfg.arch, labels=labels,
        preprocess={"kind": "ssd", "size": model.config.input_size}, postprocess={"semantics": "book"},
        metadata=metadata)
    if cfg.state_dict:  # the book's torch.save(net.state_dict(), 'weights/ssd300_N.pth')
        save_state_dict(model, cfg.out / f"{name}_state_dict.pth")
    return path


def train_detector(cfg: DetectorConfig) -> dict[str, Any]:
    """Run the whole command; returns a summary (best / last paths, best mAP@0.5, history)."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    labels = read_labels(cfg.data, cfg.labels)
    size = _CONFIGS[cfg.arch].input_size if cfg.arch in _CONFIGS else 300
    train_set = VOCDetection(cfg.data, cfg.train_split, labels, size, cfg.augment, cfg.seed, drop_empty=True)
    val_set = VOCDetection(cfg.data, cfg.val_split, labels, size)
    if len(train_set) == 0:
        raise SystemExit(f"error: {cfg.data}: the {cfg.train_split} split has no image with a usable object")
    dropped = f" ({train_set.dropped} without usable objects left out)" if train_set.dropped else ""
    say(f"{cfg.data}: {len(train_set)} train{dropped} / {len(val_set)} val images, {len(labels)} classes")
    if cfg.base is not None and cfg.base_classifier is not None:
        raise SystemExit("error: give --base or --base-classifier, not both")
    model = build_detector(cfg.arch, len(labels) + 1, cfg.width, cfg.base,
                           quiet=cfg.base_classifier is not None)
    if cfg.batchnorm:
        model = add_batchnorm(model)
    base = str(cfg.base or "random")
    if cfg.base_classifier is not None:
        base = base_from_classifier(model, cfg.base_classifier)
    model = model.to(device)
    criterion = MultiBoxLoss(default_boxes(model.config)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    loader_args: dict[str, Any] = {"batch_size": cfg.batch_size, "num_workers": cfg.workers,
                                   "collate_fn": collate, "persistent_workers": False,
                                   "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > cfg.batch_size,
                              **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)

    history: list[dict[str, Any]] = []
    start_epoch, best_map, iteration = 1, -1.0, 0
    if cfg.resume is not None:
        state = load_train_state(cfg.resume, COMMAND)
        if state["labels"] != labels or state["arch"] != cfg.arch or state["width"] != cfg.width:
            raise SystemExit(f"error: --resume {cfg.resume}: it trained {state['arch']} width "
                             f"{state['width']} on {state['labels']}; this run is {cfg.arch} width "
                             f"{cfg.width} on {labels}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])
        best_map, iteration = float(state["best_map"]), int(state["iteration"])
        say(f"resuming after epoch {start_epoch - 1} from {cfg.resume}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    variant = f"{cfg.arch.upper()} width {width_label(cfg.width)}"
    say(f"{variant}{' (+BatchNorm while training)' if cfg.batchnorm else ''}, base {base}, "
        f"on {device}; {cfg.epochs} epochs, "
        f"validation every {cfg.val_every} and after the last")

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        train_set.set_epoch(epoch)
        loss_sums = {"loc": 0.0, "conf": 0.0}
        seen = 0
        bar = progress(train_loader, cfg.progress, f"epoch {epoch} train")
        for images, targets, _ in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, epoch, iteration)
            loc, conf = model(images.to(device))
            loss_l, loss_c = criterion(loc, conf, targets)
            loss = loss_l + loss_c
            if not math.isfinite(loss.item()):
                raise SystemExit(f"error: the loss became {loss.item()} in epoch {epoch} "
                                 f"(iteration {iteration}); lower --lr or add --warmup-iters")
            optimizer.zero_grad()
            loss.backward()
            if cfg.clip is not None:
                nn.utils.clip_grad_value_(model.parameters(), cfg.clip)
            optimizer.step()
            loss_sums["loc"] += float(loss_l.item()) * images.shape[0]
            loss_sums["conf"] += float(loss_c.item()) * images.shape[0]
            seen += images.shape[0]
            iteration += 1
            bar.set_postfix_str(f"loss {(loss_sums['loc'] + loss_sums['conf']) / seen:.3f}", refresh=False)
        record: dict[str, Any] = {
            "epoch": epoch, "train_loss": (loss_sums["loc"] + loss_sums["conf"]) / seen,
            "train_loss_loc": loss_sums["loc"] / seen, "train_loss_conf": loss_sums["conf"] / seen,
            "lr": optimizer.param_groups[0]["lr"],
        }
        line = (f"epoch {epoch}/{cfg.epochs}  train loss {record['train_loss']:.4f} "
                f"(loc {record['train_loss_loc']:.4f}, conf {record['train_loss_conf']:.4f})")
        validate = epoch % cfg.val_every == 0 or epoch == cfg.epochs
        metadata: dict[str, Any] = {
            "trainer": COMMAND, "variant": variant, "width": cfg.width, "base": base,
            "data": str(cfg.data), "epoch": epoch, "seed": cfg.seed, "augment": cfg.augment,
            "batchnorm": "trained with BatchNorm after each base and extra conv, folded into the convs"
            if cfg.batchnorm else "none",
        }
        if validate:
            result = evaluate_detector(model, val_loader, criterion, device, cfg.progress,
                                       f"epoch {epoch} val")
            record.update({k: v for k, v in result.items() if k != "per_class"})
            record["ap_per_class"] = result["per_class"]
            line += (f" | val loss {result['val_loss']:.4f} mAP@0.5 {result['map_50']:.3f} "
                     f"AP@[.5:.95] {result['map']:.3f}")
        record["seconds"] = round(time.perf_counter() - started, 2)
        history.append(record)
        say(f"{line}  ({record['seconds']:.1f} s)")
        metadata["history"] = history
        if validate:
            metadata.update({"val_map_50": record["map_50"], "val_map": record["map"]})
            if record["map_50"] > best_map:
                best_map = record["map_50"]
                _save(cfg, model, "best", labels, metadata)
        _save(cfg, model, "last", labels, metadata)
        save_train_state(cfg.out, {
            "command": COMMAND, "config": plain_config(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "iteration": iteration, "history": history,
            "best_map": best_map, "labels": labels, "arch": cfg.arch, "width": cfg.width,
        })
        write_history(cfg.out, history)
    best = cfg.out / "best.pth"
    say(f"best mAP@0.5 {best_map:.3f}: {best}\nserve it with a models file entry:\n"
        f'[[models]]\nname = "my-detector"\ntask = "detect"\narch = "{cfg.arch}"\n'
        f'format = "project"\nweights = "{best.resolve()}"')
    return {"best": best, "last": cfg.out / "last.pth", "best_map_50": best_map, "history": history,
            "labels": labels}
