"""Shared fixtures for tests/models: sample photos and checkpoint files written once per session.

Tiny files use width 1/16 (a few hundred kB, millisecond forwards); the ``full_*`` fixtures write
real-size files (VGG16 528 MB, SSD300 100 MB) for the equality checks against torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.labels import VOC_CLASSES
from tests import checkpoint_factory as cf

TINY = 1 / 16


def _sample(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image  # real photos shipped with scikit-learn

    return Image.fromarray(load_sample_image(name))


@pytest.fixture(scope="session")
def china() -> Image.Image:
    """A 640x427 RGB photo."""
    return _sample("china.jpg")


@pytest.fixture(scope="session")
def flower() -> Image.Image:
    """A 640x427 RGB photo."""
    return _sample("flower.jpg")


@pytest.fixture(scope="session")
def portrait() -> Image.Image:
    """A 301x517 (portrait, odd sizes) RGB image of seeded noise with some structure."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (517 // 8 + 1, 301 // 8 + 1, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:517, :301]
    noise = rng.integers(-20, 21, big.shape)
    return Image.fromarray(np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny(ckpt_dir: Path) -> dict[str, Path]:
    """Every checkpoint kind at width 1/16, by name."""
    d = ckpt_dir / "tiny"
    files = {
        "tv_vgg16": cf.write_torchvision_vgg16(d / "vgg16-397923af.pth", width=TINY),
        "tv_vgg16_bn": cf.write_torchvision_vgg16_bn(d / "vgg16_bn-6c64b313.pth", width=TINY),
        "book_vgg16": cf.write_book_vgg16(d / "weights_fine_tuning.pth", width=TINY),
        "book_ssd300": cf.write_book_ssd(d / "ssd300_50.pth", width=TINY),
        "book_ssd300_confident": cf.write_book_ssd(d / "ssd300_confident.pth", width=TINY, confident=True),
        "amdegroot_ssd300": cf.write_book_ssd(
            d / "ssd300_mAP_77.43_v2.pth", width=TINY, amdegroot_order=True, gpu=False
        ),
        "dp_ssd300": cf.write_book_ssd(d / "ssd300_dp.pth", width=TINY, data_parallel=True),
        "book_ssd512": cf.write_book_ssd(d / "ssd512.pth", width=TINY, size=512, confident=True),
        "tv_ssd300": cf.write_torchvision_ssd300(
            d / "ssd300_vgg16_coco-b556d3b4.pth", width=TINY, confident=True
        ),
        "project_ssd300": cf.write_project(
            d / "project_ssd300.pth", cf.ssd_project_dict(VOC_CLASSES, width=TINY, confident=True)
        ),
        "project_ssd512": cf.write_project(
            d / "project_ssd512.pth", cf.ssd_project_dict(VOC_CLASSES, width=TINY, size=512)
        ),
        "project_vgg16": cf.write_project(
            d / "project_vgg16.pth", cf.vgg_project_dict(["ant", "bee", "wasp"], width=TINY)
        ),
        "pickled_model": cf.write_pickled_model(d / "whole_model.pth"),
    }
    files["truncated_zip"] = cf.write_truncated(d / "truncated.pth", files["tv_ssd300"])
    files["truncated_legacy"] = cf.write_truncated(d / "truncated_legacy.pth", files["book_ssd300"])
    return files


@pytest.fixture(scope="session")
def full_tv_vgg16(ckpt_dir: Path) -> Path:
    """torchvision's ImageNet VGG16 file at real size (seeded random weights)."""
    return cf.write_torchvision_vgg16(ckpt_dir / "full" / "vgg16-397923af.pth", seed=1)


@pytest.fixture(scope="session")
def full_book_ssd300(ckpt_dir: Path) -> Path:
    """The book's SSD300 VOC file at real size, saved from cuda:0."""
    return cf.write_book_ssd(ckpt_dir / "full" / "ssd300_50.pth", seed=2)


@pytest.fixture(scope="session")
def full_tv_ssd300(ckpt_dir: Path) -> Path:
    """torchvision's COCO SSD300 file at real size, giving a few confident detections."""
    return cf.write_torchvision_ssd300(ckpt_dir / "full" / "ssd300_vgg16_coco.pth", seed=3, confident=True)
