"""python -m train classifier: modes, optimizer groups, loss bookkeeping, the command and its files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from models import ModelSpec, load_model
from models.preprocess import ClassifierTransform
from tests import checkpoint_factory as cf
from tests.train.conftest import CLASSIFIER_RUN, command
from train.__main__ import main
from train.classifier import build_classifier, classifier_step, load_folders, make_optimizer
from train.loop import run_epoch
from train.synth import CLASSES

TINY = 1 / 16


def _fixed_batch(data: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every train image through the validation transform (no randomness), as one batch."""
    folder = ImageFolder(str(data / "train"), transform=ClassifierTransform(size, size))
    images, labels = zip(*(folder[i] for i in range(len(folder))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_transfer_mode_trains_only_the_head_and_leaves_the_rest_bit_identical(folders_data: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_classifier("vgg16_bn", 4, TINY, pretrained=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, "transfer", lr_head=0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.6.weight", "classifier.6.bias"]
    train, _ = load_folders(folders_data, 32, 32)
    loader = DataLoader(train, batch_size=8, shuffle=True)
    run_epoch(model, loader, classifier_step(model, torch.device("cpu")), optimizer)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # parameters AND BatchNorm running statistics of the frozen layers are untouched
    assert changed == ["classifier.6.weight", "classifier.6.bias"]


def test_finetune_optimizer_has_the_three_learning_rates() -> None:
    model, _ = build_classifier("vgg16", 2, TINY, pretrained=None)
    optimizer = make_optimizer(model, "finetune")
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-4, 1e-3]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert len(groups[0]) == 26 and all(n.startswith("features.") for n in groups[0])  # the book's 26 tensors
    assert groups[1] == [
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    assert groups[2] == ["classifier.6.weight", "classifier.6.bias"]
    assert all(p.requires_grad for p in model.parameters())
    custom = make_optimizer(
        model, "finetune", lr_features=1e-3, lr_classifier=2e-3, lr_head=3e-3, momentum=0.5
    )
    assert [(g["lr"], g["momentum"]) for g in custom.param_groups] == [(1e-3, 0.5), (2e-3, 0.5), (3e-3, 0.5)]


def test_a_few_steps_reduce_the_loss_on_tiny_data(folders_data: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_classifier("vgg16_bn", 4, TINY, pretrained=None)
    optimizer = make_optimizer(model, "finetune", 0.005, 0.005, 0.005)
    images, labels = _fixed_batch(folders_data)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(images), labels))

    start = loss_now()
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    assert loss_now() < 0.75 * start  # 16 images memorised: ~1.39 -> ~0.4-0.6 with seeds 0-2


def test_epoch_loss_weights_each_batch_by_its_size(folders_data: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_classifier("vgg16", 4, TINY, pretrained=None)
    _, val = load_folders(folders_data, 32, 32)
    loader = DataLoader(val, batch_size=3)
    means = run_epoch(model, loader, classifier_step(model, torch.device("cpu")))
    images = torch.stack([val[i][0] for i in range(len(val))])  # 8 images: batches of 3, 3, 2
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model.eval()(images)
    assert means["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert means["acc"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_imagenet_weights_only_fit_full_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_imagenet = cf.write_torchvision_vgg16(tmp_path / "vgg16-397923af.pth", width=TINY)
    _, init = build_classifier("vgg16", 2, TINY, pretrained=tiny_imagenet)
    assert init == "scratch" and "ImageNet weights fit vgg16 at width 1" in capsys.readouterr().err
    _, init = build_classifier("vgg16", 2, 1.0, pretrained=tmp_path / "absent.pth")
    assert init == "scratch" and "absent.pth is not there" in capsys.readouterr().err


def test_command_writes_checkpoints_the_service_loads_and_resumes(
    trained_classifier: Path, folders_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(trained_classifier, tmp_path / "run"))
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert "train_loss" not in history[0] and "train_loss" in history[1]  # epoch 0 only evaluates

    spec = ModelSpec(
        name="shapes", task="classify", arch="vgg16_bn", format="project", weights=out / "best.pth"
    )
    classifier = load_model(spec)
    assert classifier.info.labels == sorted(CLASSES) and classifier.info.input_size == (32, 32)
    assert classifier.info.format == "project"
    transform = classifier.transform
    assert isinstance(transform, ClassifierTransform) and (transform.resize, transform.crop) == (32, 32)
    metadata = torch.load(out / "best.pth", weights_only=True)["metadata"]
    assert metadata["variant"] == "VGG16-BN width 1/16" and metadata["width"] == TINY
    assert metadata["mode"] == "finetune" and metadata["init"] == "scratch"
    best_epoch = max(history, key=lambda h: (h["val_acc"], -h["val_loss"]))["epoch"]
    assert metadata["epoch"] == best_epoch
    # the book's plain state_dict, served as format "state_dict"
    plain = ModelSpec(
        name="plain",
        task="classify",
        arch="vgg16_bn",
        format="state_dict",
        weights=out / "last_state_dict.pth",
        labels=tuple(sorted(CLASSES)),
        resize=32,
        crop=32,
    )
    assert load_model(plain).info.num_classes == 4

    capsys.readouterr()
    resume = command("classifier", CLASSIFIER_RUN, "--data", folders_data, "--out", out, "--resume", out)
    assert main([*resume, "--epochs", "3"]) == 0
    assert "resuming after epoch 2" in capsys.readouterr().err
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1, 2, 3]
    assert main([*resume, "--epochs", "4", "--mode", "transfer"]) == 2
    assert (
        "trained a network with --mode finetune; this run asks for --mode transfer" in capsys.readouterr().err
    )
