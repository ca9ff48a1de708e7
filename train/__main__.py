"""``python -m train {synth,classifier,detector,evaluate} ...``: make data, train, write servable
checkpoints and score them.

    python -m train synth --layout folders --out data/shapes-cls --train 800 --val 200
    python -m train synth --layout voc --out data/shapes-voc --train 1000 --val 200
    python -m train classifier --data data/shapes-cls --mode finetune --out runs/cls
    python -m train detector --data data/shapes-voc --out runs/det
    python -m train evaluate --weights runs/det/best.pth --data data/shapes-voc --metric voc07

``python -m train COMMAND --help`` lists every option with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from train.errors import TrainError
from train.options import EVALUATE_PRECISIONS, METRICS

__all__ = ["TRAIN_EXTRA_MODULES", "main"]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

#: The modules the ``train`` extra of pyproject.toml installs (its distribution names, importable).
TRAIN_EXTRA_MODULES = ("tqdm", "faster_coco_eval")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _width(text: str) -> float:
    """A width as a number or a fraction: 0.125, 1/8."""
    try:
        value = float(text) if "/" not in text else float(text.split("/")[0]) / float(text.split("/")[1])
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a width: {text!r} (e.g. 1, 0.125 or 1/8)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"width must be in (0, 1], got {text}")
    return value


def _optional_path(text: str) -> Path | None:
    return None if text.lower() == "none" else Path(text)


def _common(p: argparse.ArgumentParser, epochs: int, batch: int) -> None:
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (best.pth, last.pth, train_state.pth)"
    )
    p.add_argument(
        "--width",
        type=_width,
        default=1.0,
        help="channel width multiplier of the VGG16 family, e.g. 1/8 (default 1: full size)",
    )
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch,
        help=f"images per step (default {batch}; lower it when memory is short)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed for torch, NumPy and Python (default 1234)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--resume", type=Path, help="continue a run: its output folder or its train_state.pth")
    p.add_argument(
        "--state-dict",
        action="store_true",
        help="also write the book's plain state_dict next to each checkpoint",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "synth",
        help="write the synthetic shapes data set",
        description="Coloured shapes on textured backgrounds, deterministic by seed.",
    )
    s.add_argument(
        "--layout",
        choices=("folders", "voc"),
        required=True,
        help="folders: DIR/{train,val}/<class>/*.jpg (classifier); voc: PASCAL VOC (detector)",
    )
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--train", type=int, default=800, help="training images (default 800)")
    s.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    s.add_argument("--seed", type=int, default=0, help="data seed (default 0); another seed = another set")
    s.add_argument("--size", type=_positive_int, help="image side (default 224 folders, 300 voc)")
    s.add_argument(
        "--max-objects", type=_positive_int, default=5, help="voc: most shapes per image (default 5)"
    )

    c = sub.add_parser(
        "classifier",
        help="VGG16 transfer learning / fine-tuning on DIR/{train,val}/<class>/",
        description="VGG16 transfer learning or fine-tuning (the book's chapter 1).",
    )
    c.add_argument("--data", type=Path, required=True, help="folder with train/<class>/ and val/<class>/")
    c.add_argument(
        "--mode",
        choices=("transfer", "finetune"),
        required=True,
        help="transfer: train only the new head; finetune: all layers, three learning rates",
    )
    c.add_argument("--arch", choices=("vgg16", "vgg16_bn"), default="vgg16")
    _common(c, epochs=2, batch=32)
    c.add_argument(
        "--size",
        type=_positive_int,
        default=224,
        help="RandomResizedCrop size and validation centre crop (default 224)",
    )
    c.add_argument(
        "--resize",
        type=_positive_int,
        help="validation: shorter side resized to this, then cropped (default: --size)",
    )
    c.add_argument("--lr-features", type=float, default=1e-4, help="finetune: features.* (default 1e-4)")
    c.add_argument(
        "--lr-classifier", type=float, default=5e-4, help="finetune: classifier.0/3 (default 5e-4)"
    )
    c.add_argument("--lr-head", type=float, default=1e-3, help="the new classifier.6 head (default 1e-3)")
    c.add_argument("--momentum", type=float, default=0.9)
    c.add_argument(
        "--pretrained",
        default=None,
        help="torchvision ImageNet VGG16 file (default weights/vgg16-397923af.pth when there); "
        "'none' to start from random weights",
    )

    d = sub.add_parser(
        "detector",
        help="SSD300 / SSD512 training on a PASCAL VOC folder",
        description="SSD training (the book's chapter 2).",
    )
    d.add_argument(
        "--data",
        type=Path,
        required=True,
        help="VOC folder: Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt",
    )
    d.add_argument("--arch", choices=("ssd300", "ssd512"), default="ssd300")
    _common(d, epochs=50, batch=32)
    d.add_argument(
        "--labels", type=Path, help="class names, one a line (default DATA/labels.txt, else VOC's 20)"
    )
    d.add_argument(
        "--base", type=Path, help="vgg16_reducedfc.pth: the VGG base to start from (default: random)"
    )
    d.add_argument(
        "--base-classifier",
        type=Path,
        help="start conv1_1..conv5_3 from a trained VGG16 / VGG16-BN classifier of the same width",
    )
    d.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    d.add_argument("--momentum", type=float, default=0.9)
    d.add_argument("--weight-decay", type=float, default=5e-4)
    d.add_argument("--clip", type=float, default=2.0, help="clip_grad_value_ bound (default 2.0; 0 = off)")
    d.add_argument(
        "--warmup-iters", type=int, default=0, help="linear learning-rate warm-up steps (default 0)"
    )
    d.add_argument(
        "--lr-steps",
        type=_positive_int,
        nargs="*",
        default=[],
        help="epochs after which the learning rate is multiplied by 0.1 (default: none)",
    )
    d.add_argument(
        "--val-every",
        type=_positive_int,
        default=10,
        help="validate (loss, --metric) every N epochs and after the last (default 10)",
    )
    d.add_argument(
        "--metric",
        choices=METRICS,
        default="voc07",
        help="what validation reports and best.pth is chosen by: voc07 (VOC2007 11-point mAP@0.5, default), "
        "voc12 (all-point mAP@0.5) or coco (AP@[.5:.95])",
    )
    d.add_argument(
        "--batchnorm",
        action="store_true",
        help="train with BatchNorm after each base/extra conv, folded into the convs on save",
    )
    d.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train without the photometric / expand / crop / mirror augmentations",
    )
    d.add_argument(
        "--train-split", default="train", help="ImageSets/Main/<name>.txt to train on (default train)"
    )
    d.add_argument(
        "--val-split", default="val", help="ImageSets/Main/<name>.txt to validate on (default val)"
    )

    e = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a held-out split, as the service answers",
        description="Top-1 / top-5 accuracy (classifier folders) or VOC / COCO mAP (VOC detector) of a "
        "project checkpoint, loaded and run through the service's own predictor.",
    )
    e.add_argument("--weights", type=Path, required=True, help="a project checkpoint (best.pth, last.pth)")
    e.add_argument("--data", type=Path, required=True, help="classifier folders or a VOC folder")
    e.add_argument(
        "--split", default="val", help="folder (classifier) or ImageSets/Main/<name>.txt (default val)"
    )
    e.add_argument("--batch-size", type=_positive_int, default=16)
    e.add_argument(
        "--precision",
        choices=EVALUATE_PRECISIONS,
        default="fp32",
        help="run the model in this precision; other than fp32 also reports the agreement "
        "with fp32 on the same images (default fp32)",
    )
    e.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="with --precision int8: a folder of images to calibrate on (not the scored ones), "
        "as VISION_INT8_CALIBRATION_DIR does for the service",
    )
    e.add_argument(
        "--metric",
        choices=METRICS,
        help="detectors: voc07 (VOC2007 11-point mAP@0.5, default), voc12 (all-point mAP@0.5) or "
        "coco (AP@[.5:.95], AP50, AP75, AR@100 from faster-coco-eval)",
    )
    e.add_argument(
        "--json",
        type=Path,
        metavar="OUT",
        help="also write the report to OUT (a classifier's confusion matrix also to "
        "OUT-confusion.png when matplotlib is installed)",
    )
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a problem with its input is a message on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            return _synth(args)  # numpy and PIL only: no torch to import
        return _torch_command(args)
    except TrainError as e:
        return _fail(str(e))
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in TRAIN_EXTRA_MODULES:
            raise
        return _fail(
            f"python -m train {args.command} needs the train extra, and {missing} is not installed: "
            "pip install -e '.[train]'"
        )


def _config(cls: type[C], args: argparse.Namespace, **changed: Any) -> C:
    """The command's config dataclass from the options of the same names, with ``changed`` values."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **changed})


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _synth(args: argparse.Namespace) -> int:
    from train.synth import write_folders, write_voc

    started = time.perf_counter()
    if args.layout == "folders":
        write_folders(args.out, args.train, args.val, args.seed, args.size or 224)
    else:
        write_voc(args.out, args.train, args.val, args.seed, args.size or 300, args.max_objects)
    print(
        f"wrote {args.train} train + {args.val} val images to {args.out} "
        f"({time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0


def _torch_command(args: argparse.Namespace) -> int:
    from models import CheckpointError, ModelConfigError

    try:
        return _evaluate(args) if args.command == "evaluate" else _train(args)
    except (CheckpointError, ModelConfigError) as e:
        return _fail(str(e))


def _evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import describe, evaluate_checkpoint, write_report

    result = evaluate_checkpoint(
        args.weights,
        args.data,
        args.split,
        args.batch_size,
        show=args.progress,
        precision=args.precision,
        calibration=args.calibration,
        metric=args.metric,
    )
    for line in describe(result):
        print(line, file=sys.stderr)
    print(json.dumps(result, indent=1))
    if args.json is not None:
        for path in write_report(result, args.json):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "classifier":
        from train.classifier import IMAGENET_VGG16, ClassifierConfig, train_classifier

        pretrained = IMAGENET_VGG16 if args.pretrained is None else _optional_path(args.pretrained)
        train_classifier(_config(ClassifierConfig, args, pretrained=pretrained))
    else:
        from train.detector import DetectorConfig, train_detector

        train_detector(_config(DetectorConfig, args, clip=args.clip or None, lr_steps=tuple(args.lr_steps)))
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
