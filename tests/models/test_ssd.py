"""The SSD network: shapes, the book's module layout and keys, torchvision key mapping and head equality."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.ssd import SSD as TorchvisionSSD

from models.checkpoints import fit_state_dict
from models.ssd import (
    SSD,
    SSD300_COCO,
    SSD300_VOC,
    SSD512_VOC,
    SSDConfig,
    book_to_torchvision,
    ssd300,
    ssd512,
    torchvision_to_book,
)
from tests.models.ssd_reference import BOOK_SSD300_KEYS, init_random_

BOOK_MEAN_RGB = torch.tensor([123.0, 117.0, 104.0])  # the book subtracts (104, 117, 123) in BGR


def _book_input(batch: int, size: int, seed: int) -> torch.Tensor:
    """Random pixels in the book's input scale: RGB 0-255 minus the mean."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 255 - BOOK_MEAN_RGB[:, None, None]


@pytest.fixture(scope="module")
def full_ssd300() -> SSD:
    """The real-size SSD300 (21 classes) with seeded random weights."""
    model = ssd300(21)
    init_random_(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def torchvision_ssd(full_ssd300: SSD) -> TorchvisionSSD:
    """torchvision's ssd300_vgg16 (21 classes) carrying full_ssd300's weights."""
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
    model.load_state_dict(book_to_torchvision(full_ssd300.state_dict()), strict=True)
    return model.eval()


@pytest.mark.parametrize(
    ("config", "width", "num_classes"),
    [
        (SSD300_VOC, 1 / 16, 21),
        (SSD300_VOC, 1 / 32, 2),
        (SSD300_COCO, 1 / 8, 91),
        (SSD512_VOC, 1 / 16, 21),
        (SSD512_VOC, 1 / 64, 5),
    ],
)
def test_output_shapes(config: SSDConfig, width: float, num_classes: int) -> None:
    model = SSD(num_classes, config, width).eval()
    size = config.input_size
    with torch.no_grad():
        loc, conf = model(_book_input(2, size, seed=1))
    anchors = 8732 if size == 300 else 24564
    assert loc.shape == (2, anchors, 4)
    assert conf.shape == (2, anchors, num_classes)
    assert loc.dtype == conf.dtype == torch.float32
    assert model.vgg[0].out_channels == max(1, round(64 * width))


@pytest.mark.parametrize("config", [SSD300_VOC, SSD512_VOC])
def test_feature_map_sizes_match_config(config: SSDConfig) -> None:
    # hooks on the box heads see each source; their spatial sizes must be the config's maps
    model = SSD(3, config, width=1 / 32).eval()
    seen: list[int] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        seen.append(output.shape[-1])

    for head in model.loc:
        head.register_forward_hook(record)
    with torch.no_grad():
        model(_book_input(1, config.input_size, seed=2))
    assert tuple(seen) == config.feature_maps


def test_rejects_wrong_input_size() -> None:
    model = SSD(21, SSD300_VOC, width=1 / 32)
    with pytest.raises(ValueError, match="300"):
        model(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError):
        ssd512(config=SSD300_VOC)
    with pytest.raises(ValueError):
        SSD(1)


def test_book_module_layout() -> None:
    with torch.device("meta"):
        model = ssd300(21)
    assert len(model.vgg) == 35
    convs = [i for i, m in enumerate(model.vgg) if isinstance(m, nn.Conv2d)]
    pools = [i for i, m in enumerate(model.vgg) if isinstance(m, nn.MaxPool2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]
    assert pools == [4, 9, 16, 23, 30]
    assert [model.vgg[i].ceil_mode for i in pools] == [False, False, True, False, False]
    conv6 = model.vgg[31]
    assert conv6.dilation == (6, 6) and conv6.padding == (6, 6)
    assert all(isinstance(m, nn.Conv2d) for m in model.extras) and len(model.extras) == 8
    assert [m.stride[0] for m in model.extras] == [1, 2, 1, 2, 1, 1, 1, 1]
    assert list(model.L2Norm.weight.shape) == [512]


def test_state_dict_matches_reference_table() -> None:
    with torch.device("meta"):
        state = ssd300(21).state_dict()
    assert len(state) == 71
    # names, shapes and the book's order (vgg, extras, L2Norm, loc, conf)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, s) for k, s, _ in BOOK_SSD300_KEYS]


def test_ssd512_state_dict_layout() -> None:
    with torch.device("meta"):
        state = ssd512(21).state_dict()
    assert [state[f"conf.{i}.weight"].shape[0] for i in range(7)] == [84, 126, 126, 126, 126, 84, 84]
    assert [state[f"loc.{i}.weight"].shape[1] for i in range(7)] == [512, 1024, 512, 256, 256, 256, 256]
    assert tuple(state["extras.9.weight"].shape) == (256, 128, 4, 4)
    assert len([k for k in state if k.startswith("extras.")]) == 20


def test_l2norm_initial_scale_and_formula() -> None:
    model = SSD(21, SSD300_VOC, width=1 / 16)
    assert torch.equal(model.L2Norm.weight, torch.full((32,), 20.0))
    x = torch.randn(2, 32, 5, 5)
    expected = 20.0 * x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
    torch.testing.assert_close(model.L2Norm(x), expected)


def test_mapping_gives_torchvision_names(full_ssd300: SSD) -> None:
    mapped = book_to_torchvision(full_ssd300.state_dict())
    assert list(mapped) == [tv for _, _, tv in BOOK_SSD300_KEYS]
    with torch.device("meta"):
        tv_keys = set(ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).state_dict())
    assert set(mapped) == tv_keys


def test_mapping_round_trip_is_identity(full_ssd300: SSD, torchvision_ssd: TorchvisionSSD) -> None:
    book = full_ssd300.state_dict()
    back = torchvision_to_book(book_to_torchvision(book))
    assert list(back) == list(book)
    assert all(back[k] is book[k] for k in book)
    tv = torchvision_ssd.state_dict()
    tv_back = book_to_torchvision(torchvision_to_book(tv))
    assert list(tv_back) == list(tv) and all(tv_back[k] is tv[k] for k in tv)


def test_mapping_rejects_foreign_keys() -> None:
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        book_to_torchvision({"features.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"vgg\.0\.weight"):
        torchvision_to_book({"vgg.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        torchvision_to_book({"backbone.extra.1.1.weight": torch.zeros(1)})  # a ReLU position


def test_head_outputs_equal_torchvision(full_ssd300: SSD, torchvision_ssd: TorchvisionSSD) -> None:
    x = _book_input(1, 300, seed=3)
    with torch.no_grad():
        loc, conf = full_ssd300(x)
        features = list(torchvision_ssd.backbone(x).values())
        head = torchvision_ssd.head(features)
    tv_loc, tv_conf = head["bbox_regression"], head["cls_logits"]
    assert loc.shape == tv_loc.shape and conf.shape == tv_conf.shape
    # the outputs are not trivially small: random weights keep activations of order 1
    assert float(loc.abs().mean()) > 0.1 and float(conf.std()) > 0.1
    for ours, theirs in ((loc, tv_loc), (conf, tv_conf)):
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
    loc_diff, conf_diff = float((loc - tv_loc).abs().max()), float((conf - tv_conf).abs().max())
    print(
        f"head max |diff|: loc {loc_diff:.3g}, conf {conf_diff:.3g}"
        f" (max |value| {float(tv_loc.abs().max()):.3g}, {float(tv_conf.abs().max()):.3g})"
    )


@pytest.mark.parametrize(
    ("num_classes", "config", "width"),
    [(21, SSD300_VOC, 1.0), (91, SSD300_COCO, 1.0), (5, SSD512_VOC, 0.25), (2, SSD300_VOC, 1 / 64)],
)
def test_fit_state_dict_reads_an_ssd(num_classes: int, config: SSDConfig, width: float) -> None:
    with torch.device("meta"):
        state = SSD(num_classes, config, width).state_dict()
    fit = fit_state_dict(state, "ssd")
    assert (fit.arch, fit.num_classes, fit.width, fit.problems) == (
        f"ssd{config.input_size}",
        num_classes,
        width,
        (),
    )


def test_fit_state_dict_names_what_does_not_fit_an_ssd() -> None:
    with torch.device("meta"):
        state = ssd300(21).state_dict()

    def problems(sd: dict[str, torch.Tensor]) -> set[tuple[str, object, object]]:
        return {(p.key, p.found, p.expected) for p in fit_state_dict(sd, "ssd").problems}

    assert problems({k: v for k, v in state.items() if k != "extras.1.bias"}) == {
        ("extras.1.bias", None, (512,))
    }
    wrong = {**state, "vgg.2.weight": torch.empty(64, 32, 3, 3, device="meta")}
    assert problems(wrong) == {("vgg.2.weight", (64, 32, 3, 3), (64, 64, 3, 3))}
    extra = {**state, "classifier.6.weight": torch.empty(2, 4096, device="meta")}
    assert problems(extra) == {("classifier.6.weight", (2, 4096), None)}
