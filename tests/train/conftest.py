"""Shared fixtures for tests/train: tiny synthetic data sets in both layouts, written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.__main__ import main
from train.synth import write_folders, write_voc

#: the options of the trained_* runs but --data, --epochs and --out (the resume tests repeat them)
CLASSIFIER_RUN = (
    "--mode finetune --arch vgg16_bn --width 1/16 --size 32 --batch-size 8 --no-progress --pretrained none "
    "--lr-features 0.01 --lr-classifier 0.01"
)
DETECTOR_RUN = (
    "--width 1/16 --batch-size 3 --val-every 1 --no-progress --batchnorm --warmup-iters 2 --lr-steps 1"
)


def command(*parts: str | Path) -> list[str]:
    """An argv from option strings ("--epochs 2", split at spaces) and paths (kept whole)."""
    return [word for part in parts for word in (part.split() if isinstance(part, str) else [str(part)])]


@pytest.fixture(scope="session")
def folders_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classifier layout: 16 train and 8 val images of 40 x 40 pixels, 4 classes."""
    return write_folders(tmp_path_factory.mktemp("shapes-cls"), train=16, val=8, seed=3, size=40)


@pytest.fixture(scope="session")
def voc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Detector layout: 6 train and 3 val images of about 120 pixels a side."""
    return write_voc(tmp_path_factory.mktemp("shapes-voc"), train=6, val=3, seed=3, size=120, max_objects=3)


@pytest.fixture(scope="session")
def trained_classifier(folders_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m train classifier`` for 2 epochs on the tiny folders: VGG16-BN width 1/16, 32 px,
    fine-tuned from scratch; returns its output folder."""
    out = tmp_path_factory.mktemp("run-cls")
    args = command("classifier", CLASSIFIER_RUN, "--data", folders_data, "--epochs 2 --state-dict --out", out)
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def trained_detector(voc_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m train detector`` for 2 epochs on the tiny VOC folder: SSD300 width 1/16, with
    augmentation, BatchNorm while training (folded on save), a warm-up and a learning-rate step, and
    validation each epoch; returns its output folder."""
    out = tmp_path_factory.mktemp("run-det")
    assert (
        main(command("detector", DETECTOR_RUN, "--data", voc_data, "--epochs 2 --state-dict --out", out)) == 0
    )
    return out
