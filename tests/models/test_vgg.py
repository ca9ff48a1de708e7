"""VGG16 / VGG16-BN: torchvision's keys and shapes, and torchvision's answers on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.models import VGG16_Weights

from models import ModelSpec, load_model
from models.checkpoints import fit_state_dict
from models.labels import IMAGENET_CATEGORIES
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from models.vgg import vgg16, vgg16_bn
from tests import checkpoint_factory as cf


def _shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize(
    ("ours", "theirs"), [(vgg16, torchvision.models.vgg16), (vgg16_bn, torchvision.models.vgg16_bn)]
)
def test_width_one_has_torchvisions_keys_shapes_and_modules(ours, theirs) -> None:  # type: ignore[no-untyped-def]
    with torch.device("meta"):
        a, b = ours(), theirs(weights=None)
    assert _shapes(a) == _shapes(b)  # same names, same order, same shapes
    assert len(a.state_dict()) == (32 if ours is vgg16 else 97)  # 13 BatchNorms x 5 entries
    assert [type(m) for m in a.modules()][1:] == [type(m) for m in b.modules()][1:]
    assert isinstance(a.avgpool, nn.AdaptiveAvgPool2d) and a.avgpool.output_size == (7, 7)


def test_num_classes_and_width_scale_every_layer() -> None:
    model = vgg16(num_classes=2, width=1 / 16)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]
    assert model.classifier[0].in_features == 32 * 7 * 7
    assert model.classifier[0].out_features == model.classifier[3].out_features == 256
    assert model.classifier[6].out_features == 2
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)


def test_fit_state_dict_reads_a_vgg() -> None:
    def read(sd: dict[str, torch.Tensor]) -> tuple[str, int, float]:
        fit = fit_state_dict(sd, "vgg")
        assert not fit.problems
        return fit.arch, fit.num_classes, fit.width

    assert read(cf.vgg16_state_dict(1000, 1 / 16)) == ("vgg16", 1000, 1 / 16)
    assert read(cf.vgg16_state_dict(2, 1 / 8, bn=True)) == ("vgg16_bn", 2, 1 / 8)
    with pytest.raises(ValueError, match="class"):
        fit_state_dict({"features.0.weight": torch.zeros(64, 3, 3, 3)}, "vgg")


def _torchvision_model(builder, path: Path) -> nn.Module:  # type: ignore[no-untyped-def]
    with torch.device("meta"):  # skip the random init of 138M parameters
        model: nn.Module = builder(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    return model


def _torchvision_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).softmax(dim=1)


@pytest.mark.slow
def test_imagenet_classifier_equals_torchvision(full_tv_vgg16: Path, china: Image.Image) -> None:
    """torchvision's ImageNet file through load_model == torchvision.models.vgg16 + softmax on the same
    weights and the same preprocessed tensor (torchvision's own preset)."""
    spec = ModelSpec(name="vgg16", task="classify", arch="vgg16", format="auto", weights=full_tv_vgg16)
    clf = load_model(spec)
    assert clf.info.format == "torchvision" and clf.info.labels == list(IMAGENET_CATEGORIES)
    assert clf.info.input_size == (224, 224)
    x = VGG16_Weights.IMAGENET1K_V1.transforms()(china)[None]
    tv = _torchvision_model(torchvision.models.vgg16, full_tv_vgg16)
    expected = _torchvision_probs(tv, x)[0]

    assert torch.equal(clf.preprocess(china), x[0])
    out = clf.predict(clf.preprocess(china)[None], top_k=5)[0]
    top = expected.topk(5)
    assert torch.equal(out.class_ids, top.indices)
    diff = (out.scores - top.values).abs().max().item()
    print(f"\nvgg16 ImageNet vs torchvision: max |probability diff| {diff:.2e}")
    assert diff < 1e-5, f"max probability difference {diff}"
    # the random model must not be degenerate: its top-1 stands out
    assert out.scores[0] > 0.05  # uniform would be 0.001


@pytest.mark.slow
def test_vgg16_bn_equals_torchvision(ckpt_dir: Path, flower: Image.Image) -> None:
    path = cf.write_torchvision_vgg16_bn(ckpt_dir / "full" / "vgg16_bn.pth", seed=4)
    assert len(torch.load(path, map_location="cpu", weights_only=True)) == 84  # no num_batches_tracked
    clf = load_model(
        ModelSpec(name="bn", task="classify", arch="vgg16_bn", format="torchvision", weights=path)
    )
    tv = _torchvision_model(torchvision.models.vgg16_bn, path)
    x = clf.preprocess(flower)[None]
    expected = _torchvision_probs(tv, x)[0]
    out = clf.predict(x, top_k=1000)[0]
    assert torch.equal(out.class_ids[:10], expected.topk(10).indices)
    diff = (out.scores - expected[out.class_ids]).abs().max().item()
    print(f"\nvgg16_bn vs torchvision: max |probability diff| {diff:.2e}")
    assert diff < 1e-5, f"max probability difference {diff}"


@pytest.mark.slow
def test_book_fine_tuned_classifier_equals_the_books_code(
    ckpt_dir: Path, china: Image.Image, flower: Image.Image
) -> None:
    """The chapter 1 file (classifier.6 = Linear(4096, 2), saved from cuda:0) answers as the book's
    inference does: vgg16 with a replaced classifier[6], map_location={'cuda:0': 'cpu'}, the 'val'
    transform (Resize(224), CenterCrop(224), ToTensor, Normalize), softmax."""
    path = cf.write_book_vgg16(ckpt_dir / "full" / "weights_fine_tuning.pth", seed=5)
    clf = load_model(
        ModelSpec(
            name="ants-bees",
            task="classify",
            arch="vgg16",
            format="state_dict",
            weights=path,
            labels=("ants", "bees"),
        )
    )
    assert clf.info.labels == ["ants", "bees"] and clf.info.format == "state_dict"

    with torch.device("meta"):  # skip the random init of 138M parameters
        net = torchvision.models.vgg16(weights=None)
        net.classifier[6] = nn.Linear(in_features=4096, out_features=2)
    sd = torch.load(path, map_location={"cuda:0": "cpu"}, weights_only=True)
    net.load_state_dict(sd, assign=True)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    book_val = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), normalize])
    x = torch.stack([book_val(china), book_val(flower)])
    expected = _torchvision_probs(net, x)

    outs = clf.predict(torch.stack([clf.preprocess(china), clf.preprocess(flower)]), top_k=2)
    for out, probs in zip(outs, expected, strict=True):
        assert torch.equal(out.class_ids, probs.argsort(descending=True))
        diff = (out.scores - probs[out.class_ids]).abs().max().item()
        print(f"\nbook fine-tuned vgg16 vs the book's code: max |probability diff| {diff:.2e}")
        assert diff < 1e-5, f"max probability difference {diff}"
