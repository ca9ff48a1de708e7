"""Convert checkpoints between layouts.

    python -m models.convert SRC DST --to {ssd.pytorch,torchvision,project}
        [--from FORMAT] [--task classify|detect] [--arch ARCH]
        [--labels a,b,c | --labels-file FILE] [--force]

- ``--to ssd.pytorch``: an SSD in torchvision's layout (or a project file) -> the book's /
  ssd.pytorch keys (``vgg.*``, ``extras.*``, ``L2Norm.weight``, ``loc.*``, ``conf.*``);
- ``--to torchvision``: a book / ssd.pytorch SSD300 -> torchvision ``ssd300_vgg16`` keys; a VGG16
  state_dict or project file -> torchvision's VGG keys (they are the same names);
- ``--to project``: any supported file -> our self-describing format (``models.checkpoints``),
  with the labels, preprocessing, default boxes and post-processing semantics the service would
  use for that file (labels from ``--labels`` / ``--labels-file`` where the format has none).

Renaming is exact: the tensors are written unchanged (SSD300: all 71). Every written file is a
plain ``torch.save`` of tensors and plain data. Bad input prints one line to stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.checkpoints import (
    build_model,
    checked_fit,
    detect_layout,
    fit_state_dict,
    project_checkpoint,
    read_checkpoint,
    resolve_format,
    sha256_file,
    unwrap_state_dict,
)
from models.detect import BOOK_POSTPROCESS
from models.errors import CheckpointError, ModelConfigError
from models.preprocess import ClassifierTransform
from models.ssd import book_to_torchvision, torchvision_to_book
from models.types import ARCHS, FORMATS, ModelSpec, Task

TARGETS = ("ssd.pytorch", "torchvision", "project")
_LAYOUT_NAMES = {
    "ssd.pytorch": "book / ssd.pytorch keys",
    "torchvision-ssd": "torchvision SSD keys",
    "vgg": "torchvision VGG keys",
    "vgg_bn": "torchvision VGG-BN keys",
    "project": "project file",
}


class ConvertError(Exception):
    """Bad input to the converter (reported on stderr, exit code 2)."""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m models.convert",
        description="Convert VGG16 / SSD checkpoints between the book's (ssd.pytorch), torchvision's and "
        "vision-serve's project layouts. Tensors are copied unchanged.",
    )
    parser.add_argument("src", type=Path, help="checkpoint to read")
    parser.add_argument("dst", type=Path, help="file to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument(
        "--from",
        dest="src_format",
        default="auto",
        choices=FORMATS,
        help="format of SRC (default: detected from its keys)",
    )
    parser.add_argument("--task", choices=("classify", "detect"), help="default: from SRC's keys")
    parser.add_argument("--arch", choices=ARCHS, help="default: from SRC's keys")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (for --to project)")
    labels.add_argument("--labels-file", type=Path, help="class names, one per line (for --to project)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    return parser.parse_args(argv)


def _labels(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.labels is not None:
        names = [s.strip() for s in args.labels.split(",")]
    elif args.labels_file is not None:
        try:
            text = args.labels_file.read_text(encoding="utf-8")
        except OSError as e:
            raise ConvertError(f"cannot read --labels-file {args.labels_file}: {e.strerror or e}") from None
        names = [line.strip() for line in text.splitlines()]
    else:
        return None
    names = [n for n in names if n]
    if not names:
        raise ConvertError("--labels / --labels-file gives no class names")
    return tuple(names)


def _inferred(obj: Any, layout: str) -> tuple[Task, str]:
    """(task, arch) that SRC's keys say."""
    if layout == "project":
        return obj["task"], obj["arch"]
    sd = unwrap_state_dict(obj)
    if layout in ("vgg", "vgg_bn"):
        return "classify", fit_state_dict(sd, "vgg").arch
    if layout == "torchvision-ssd":
        sd = torchvision_to_book(sd)
    return "detect", fit_state_dict(sd, "ssd").arch


def _rename(obj: Any, layout: str, to: str, src: Path) -> dict[str, Tensor]:
    """Key-only conversion to ``to`` ("ssd.pytorch" or "torchvision")."""
    sd = unwrap_state_dict(obj["state_dict"] if layout == "project" else obj, src)
    if layout == "project":
        layout = "ssd.pytorch" if obj["task"] == "detect" else "vgg"
    if layout in ("vgg", "vgg_bn"):
        if to != "torchvision":
            raise ConvertError(f"{src} is a VGG16 classifier, not an SSD: use --to torchvision or project")
        checked_fit(src, sd, "vgg")
        return sd
    book = torchvision_to_book(sd) if layout == "torchvision-ssd" else sd
    arch = checked_fit(src, book, "ssd").arch
    if to == "ssd.pytorch":
        return book
    if arch != "ssd300":
        raise ConvertError(f"{src} is an {arch.upper()}; torchvision's layout exists for SSD300 only")
    return book_to_torchvision(book)


def convert(args: argparse.Namespace) -> str:
    """Do the conversion ``args`` describe; returns the report to print."""
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.force:
        raise ConvertError(f"{dst} exists; pass --force to overwrite it")
    if src.exists() and dst.resolve() == src.resolve():
        raise ConvertError("SRC and DST are the same file")
    labels = _labels(args)
    obj, digest = read_checkpoint(src, "cpu")
    layout = detect_layout(obj)
    if layout in ("unknown", "ssd-vgg-base"):
        keys = list(unwrap_state_dict(obj, src))[:3]
        raise ConvertError(f"{src} is not a checkpoint this tool knows (first keys: {', '.join(keys)})")
    try:
        task, arch = _inferred(obj, layout)
    except (ValueError, KeyError) as e:
        raise ConvertError(f"{src} is in {layout} layout but does not fit its network: {e}") from None
    if args.arch is not None and args.arch != arch:
        raise ConvertError(f"{src} holds a {arch}, not the --arch {args.arch} given")
    # the loader's checks of the format and task against the file's keys
    spec = ModelSpec(
        name=src.stem, task=args.task or task, arch=arch, format=args.src_format, weights=src, labels=labels
    )
    src_format = resolve_format(spec, src, obj, layout)
    if args.to == "project":
        built = build_model(spec, "cpu")
        if isinstance(built.transform, ClassifierTransform):
            preprocess: dict[str, Any] = {
                "kind": "classifier",
                "resize": built.transform.resize,
                "crop": built.transform.crop,
            }
            postprocess: dict[str, Any] | None = None
        else:
            assert built.postprocess is not None
            preprocess = {"kind": "ssd", "size": built.transform.size}
            semantics = "book" if built.postprocess == BOOK_POSTPROCESS else "torchvision"
            postprocess = {"semantics": semantics, "class_offset": built.class_offset}
        metadata = {"converted_from": src.name, "source_format": built.format, "source_sha256": digest}
        out: dict[str, Any] = project_checkpoint(
            built.model,
            task=built.task,
            arch=built.arch,
            labels=built.labels,
            preprocess=preprocess,
            postprocess=postprocess,
            metadata=metadata,
        )
        tensors = len(out["state_dict"])
        what = f"vision-serve project {built.arch}, {len(built.labels)} labels, {tensors} tensors"
    else:
        try:
            out = _rename(obj, layout, args.to, src)
        except ValueError as e:
            raise ConvertError(f"{src} does not fit its network: {e}") from None
        what = f"{args.to} layout, {len(out)} tensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    return (
        f"read {src}: {src_format} {arch} ({_LAYOUT_NAMES.get(layout, layout)}), sha256 {digest[:16]}\n"
        f"wrote {dst}: {what}, sha256 {sha256_file(dst)[:16]}"
    )


# The loader words its messages for the models file; here the same facts come from options.
_OPTION_WORDS = (
    ("the models file says format = ", "--from is "),
    ("use format = ", "use --from "),
    ("the models file says arch = ", "--arch is "),
    ("use arch = ", "use --arch "),
    ("the models file says task = ", "--task is "),
    ("the models file must give its", "pass its"),
    ("(labels = [...] or labels_file)", "(--labels or --labels-file)"),
    ("the models file gives", "--labels gives"),
    ("models file", "options"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 done, 2 bad input)."""
    args = _parse_args(argv)
    try:
        print(convert(args))
    except (ConvertError, CheckpointError, ModelConfigError) as e:
        message = str(e)
        for words, option in _OPTION_WORDS:
            message = message.replace(words, option)
        print(f"models.convert: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
