"""Benchmark inputs: JPEGs of realistic sizes made from packaged photos, random-weight checkpoints.

Photos: scikit-learn ships ``sklearn/datasets/images/china.jpg`` and ``flower.jpg`` (640x427, CC BY
2.0, see that folder's README.txt). They are centre-cropped to the target aspect ratio, resized
with Lanczos and saved as JPEG quality 90 at 500x375 (a typical PASCAL VOC photo) and 1920x1080.
The files are found on ``sys.path`` without importing scikit-learn; where it is not installed,
matplotlib's ``sample_data/grace_hopper.jpg`` is used, and failing both a synthetic image (smooth
gradients and noise), which ``inputs.json`` marks as such.

Checkpoints: no trained weights exist here, so the benchmark writes full-size random ones in the
real layouts the service reads (with ``tests/checkpoint_factory.py``): VGG16 in torchvision's layout
and SSD300 in ssd.pytorch's (``vgg.*``, ``extras.*``, ``L2Norm.weight``, ``loc.*``, ``conf.*``),
plus one ``models-<name>.toml`` per model. Throughput does not depend on the weights' values except
through detection post-processing; the SSD is the factory's ``confident`` one (a few confident
boxes, background elsewhere), as a trained model gives on an ordinary photo.

``python -m bench.inputs --out DIR`` writes both; existing files with the same version are reused.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: Output sizes (width, height): a PASCAL VOC-sized photo and full HD.
SIZES: tuple[tuple[int, int], ...] = ((500, 375), (1920, 1080))
#: JPEG quality of the re-encoded photos.
JPEG_QUALITY = 90
PHOTOS: tuple[str, ...] = ("china", "flower")
#: Bumped when the checkpoint recipe changes, so stale files are rewritten.
CHECKPOINT_VERSION = 2
#: VOC class names, background excluded (the book's order; ``models.labels.VOC_CLASSES``).
VOC_NUM_CLASSES = 20


def find_packaged_file(relative: str) -> Path | None:
    """The first ``sys.path`` entry holding ``relative`` (e.g. ``sklearn/datasets/images/china.jpg``)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / relative
        if candidate.is_file():
            return candidate
    return None


def source_photos() -> tuple[list[tuple[str, Image.Image]], str]:
    """The photos to encode and where they came from (``sklearn``, ``matplotlib`` or ``synthetic``)."""
    found = [(n, find_packaged_file(f"sklearn/datasets/images/{n}.jpg")) for n in PHOTOS]
    if all(path is not None for _, path in found):
        return [(n, Image.open(p).convert("RGB")) for n, p in found if p is not None], "sklearn"
    hopper = find_packaged_file("matplotlib/mpl-data/sample_data/grace_hopper.jpg")
    if hopper is not None:
        return [("hopper", Image.open(hopper).convert("RGB"))], "matplotlib"
    return [("synthetic", synthetic_photo(640, 427))], "synthetic"


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with mild noise: compresses and decodes roughly like a photo."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 128 + 90 * np.sin((x + y) / 71.0)
    b = 128 + 80 * np.cos(x / 23.0 - y / 41.0)
    rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop ``image`` to the aspect ratio ``width:height``, then resize (Lanczos)."""
    w, h = image.size
    if w * height > h * width:  # too wide: crop the sides
        new_w = round(h * width / height)
        left = (w - new_w) // 2
        image = image.crop((left, 0, left + new_w, h))
    else:
        new_h = round(w * height / width)
        top = (h - new_h) // 2
        image = image.crop((0, top, w, top + new_h))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class BenchImage:
    """One benchmark JPEG: ``name`` like ``china_500x375``."""

    name: str
    path: Path
    width: int
    height: int
    source: str


def write_images(out_dir: Path, sizes: Sequence[tuple[int, int]] = SIZES) -> list[BenchImage]:
    """Write the benchmark JPEGs into ``out_dir`` and list them in ``inputs.json``.

    Files that an earlier run wrote (listed in ``inputs.json``) are reused as they are, even where the
    photos they came from are not installed here (a GPU machine without scikit-learn).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    index = out_dir / "inputs.json"
    wanted = {f"{w}x{h}" for w, h in sizes}
    if index.exists():
        listed = [
            BenchImage(m["name"], out_dir / m["file"], m["width"], m["height"], m["source"])
            for m in json.loads(index.read_text())
        ]
        kept = [i for i in listed if f"{i.width}x{i.height}" in wanted and i.path.exists()]
        if {f"{i.width}x{i.height}" for i in kept} == wanted:
            return kept
    photos, source = source_photos()
    images = []
    for name, photo in photos:
        for w, h in sizes:
            path = out_dir / f"{name}_{w}x{h}.jpg"
            if not path.exists():
                path.write_bytes(encode_jpeg(fit(photo, w, h)))
            images.append(BenchImage(f"{name}_{w}x{h}", path, w, h, source))
    meta = [{"name": i.name, "file": i.path.name, "width": i.width, "height": i.height,
             "bytes": i.path.stat().st_size, "source": i.source} for i in images]  # fmt: skip
    index.write_text(json.dumps(meta, indent=2))
    return images


#: How many calibration images ``write_calibration`` makes for int8 (``VISION_INT8_CALIBRATION_DIR``).
CALIBRATION_IMAGES = 24


def write_calibration(out_dir: Path, count: int = CALIBRATION_IMAGES, seed: int = 0) -> Path:
    """Images for int8 calibration in ``out_dir``: seeded random crops (a third to all of each
    side), some mirrored, of the same packaged photos, at 500x375. The random-weight benchmark models
    have no "own kind" of image, so these only make the activation ranges photo-like; for a real
    model, calibrate on its own images (README, "Precision"). Existing files are kept."""
    import random

    out_dir.mkdir(parents=True, exist_ok=True)
    if len(list(out_dir.glob("*.jpg"))) >= count:
        return out_dir
    rng = random.Random(seed)
    photos, _ = source_photos()
    for i in range(count):
        name, photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.33, 1.0)), int(h * rng.uniform(0.33, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (out_dir / f"{name}_{i:02d}.jpg").write_bytes(encode_jpeg(fit(crop, 500, 375)))
    return out_dir


def images_of_size(images: Sequence[BenchImage], size: str) -> list[BenchImage]:
    """The images whose ``WxH`` is ``size`` (e.g. ``500x375``); ValueError when there are none."""
    chosen = [i for i in images if f"{i.width}x{i.height}" == size]
    if not chosen:
        raise ValueError(f"no benchmark image of size {size}; have {sorted({i.name for i in images})}")
    return chosen


# --- checkpoints -------------------------------------------------------------------------------


def _write_checkpoint(name: str, path: Path) -> None:
    """Write ``name``'s random full-size checkpoint with the test suite's factory, which builds the
    real layouts from the reference's key tables (not from ``models``)."""
    from tests.checkpoint_factory import write_book_ssd, write_torchvision_vgg16

    if name == "vgg16":
        write_torchvision_vgg16(path, seed=0)
    else:  # a few confident boxes, like a trained SSD on an ordinary photo
        write_book_ssd(path, num_classes=VOC_NUM_CLASSES + 1, confident=True, gpu=False, seed=0)


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: its models.toml entry, checkpoint and models-file."""

    name: str  # also the served model's name
    task: str
    arch: str
    format: str
    weights: Path
    models_file: Path
    labels: tuple[str, ...] | None


#: The benchmark's models: name -> (task, arch, checkpoint format).
MODELS: dict[str, tuple[str, str, str]] = {
    "vgg16": ("classify", "vgg16", "torchvision"),
    "ssd300": ("detect", "ssd300", "ssd.pytorch"),
}


def voc_labels() -> tuple[str, ...]:
    from models.labels import VOC_CLASSES

    return tuple(VOC_CLASSES)


def _toml_entry(model: BenchModel) -> str:
    lines = [
        "[[models]]",
        f'name = "{model.name}"',
        f'task = "{model.task}"',
        f'arch = "{model.arch}"',
        f'format = "{model.format}"',
        f'weights = "{model.weights.name}"',
        "default = true",
    ]
    if model.labels is not None:
        lines.append("labels = [" + ", ".join(f'"{label}"' for label in model.labels) + "]")
    return "\n".join(lines) + "\n"


def bench_model(name: str, work_dir: Path) -> BenchModel:
    """Where ``name``'s checkpoint and models-file live under ``work_dir`` (nothing written)."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; known: {sorted(MODELS)}")
    task, arch, fmt = MODELS[name]
    labels = voc_labels() if fmt == "ssd.pytorch" else None
    weights = work_dir / f"{name}_random_v{CHECKPOINT_VERSION}.pth"
    return BenchModel(name, task, arch, fmt, weights, work_dir / f"models-{name}.toml", labels)


def write_model(name: str, work_dir: Path) -> BenchModel:
    """Write ``name``'s random checkpoint (unless present) and its one-model ``models-<name>.toml``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    model = bench_model(name, work_dir)
    if not model.weights.exists():
        tmp = model.weights.with_suffix(".tmp")
        _write_checkpoint(name, tmp)
        tmp.replace(model.weights)
    model.models_file.write_text(_toml_entry(model))
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inputs", description="write benchmark inputs")
    parser.add_argument("--out", type=Path, default=Path("bench-results/work"))
    parser.add_argument("--models", default="vgg16,ssd300", help="comma-separated; empty for images only")
    args = parser.parse_args(argv)
    for image in write_images(args.out / "images"):
        print(f"{image.path}  ({image.source})")
    print(f"{write_calibration(args.out / 'calibration')}  (int8 calibration)")
    for name in filter(None, args.models.split(",")):
        model = write_model(name, args.out)
        print(f"{model.weights}  {model.models_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
