"""Default boxes: counts, hand-computed values, the book's centre clamp, order, torchvision's COCO boxes."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from models.anchors import default_boxes
from models.ssd import SSD300_COCO, SSD300_VOC, SSD512_VOC, SSDConfig
from tests.models.ssd_reference import book_dbox_list

# SSD300 sources: 38x38x4, 19x19x6, 10x10x6, 5x5x6, 3x3x4, 1x1x4 boxes; first index of each source
SSD300_STARTS = (0, 5776, 5776 + 2166, 8542, 8542 + 150, 8692 + 36)


@pytest.fixture(scope="module")
def voc300() -> torch.Tensor:
    return default_boxes(SSD300_VOC)


@pytest.fixture(scope="module")
def coco300() -> torch.Tensor:
    return default_boxes(SSD300_COCO)


def test_counts_and_dtype(voc300: torch.Tensor, coco300: torch.Tensor) -> None:
    # 38²·4 + 19²·6 + 10²·6 + 5²·6 + 3²·4 + 1²·4 = 8732
    assert voc300.shape == (8732, 4) and coco300.shape == (8732, 4)
    # 64²·4 + 32²·6 + 16²·6 + 8²·6 + 4²·6 + 2²·4 + 1²·4 = 16384 + 6144 + 1536 + 384 + 96 + 16 + 4 = 24564
    assert default_boxes(SSD512_VOC).shape == (24564, 4)
    assert voc300.dtype == torch.float32
    assert SSD300_VOC.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert SSD512_VOC.boxes_per_location == (4, 6, 6, 6, 6, 4, 4)
    assert SSD300_VOC.num_boxes == 8732 and SSD512_VOC.num_boxes == 24564


def _f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        # source 0: 38x38, step 8 -> f_k = 300/8 = 37.5; s = 30/300 = 0.1; s' = sqrt(0.1 * 60/300)
        (0, (0.5 / 37.5, 0.5 / 37.5, 0.1, 0.1)),
        (1, (0.5 / 37.5, 0.5 / 37.5, math.sqrt(0.02), math.sqrt(0.02))),
        (2, (0.5 / 37.5, 0.5 / 37.5, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2))),  # ar 2, wide
        (3, (0.5 / 37.5, 0.5 / 37.5, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2))),  # ar 2, tall
        (4, (1.5 / 37.5, 0.5 / 37.5, 0.1, 0.1)),  # next column j = 1: cx = 1.5/37.5 = 0.04
        (38 * 4, (0.5 / 37.5, 1.5 / 37.5, 0.1, 0.1)),  # next row i = 1
        (5775, (37.5 / 37.5, 37.5 / 37.5, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2))),  # i = j = 37, last box
        # source 1: 19x19, step 16 -> f_k = 18.75; s = 60/300 = 0.2; s' = sqrt(0.2 * 111/300) = sqrt(0.074)
        (5776, (0.5 / 18.75, 0.5 / 18.75, 0.2, 0.2)),
        (5777, (0.5 / 18.75, 0.5 / 18.75, math.sqrt(0.074), math.sqrt(0.074))),
        (5780, (0.5 / 18.75, 0.5 / 18.75, 0.2 * math.sqrt(3), 0.2 / math.sqrt(3))),  # ar 3, wide
        (5781, (0.5 / 18.75, 0.5 / 18.75, 0.2 / math.sqrt(3), 0.2 * math.sqrt(3))),  # ar 3, tall
        # source 2: 10x10, step 32 -> f_k = 9.375; s = 111/300 = 0.37; s' = sqrt(0.37 * 0.54)
        (7942, (0.5 / 9.375, 0.5 / 9.375, 0.37, 0.37)),
        (7943, (0.5 / 9.375, 0.5 / 9.375, math.sqrt(0.37 * 0.54), math.sqrt(0.37 * 0.54))),
        # last location i = j = 9: cx = cy = 9.5/9.375 = 1.0133, clamped to 1.0 by the book
        (7942 + 99 * 6, (1.0, 1.0, 0.37, 0.37)),
        # source 4: 3x3, step 100 -> f_k = 3; s = 213/300 = 0.71; ar 2 wide: 0.71*sqrt(2) = 1.004 -> 1.0
        (8692 + 2, (0.5 / 3, 0.5 / 3, 1.0, 0.71 / math.sqrt(2))),
        # source 5: 1x1, step 300; s = 264/300 = 0.88; s' = sqrt(0.88 * 315/300) = sqrt(0.924);
        # ar 2: 0.88*sqrt(2) = 1.2445 -> 1.0 and 0.88/sqrt(2) = 0.6223
        (8728, (0.5, 0.5, 0.88, 0.88)),
        (8729, (0.5, 0.5, math.sqrt(0.924), math.sqrt(0.924))),
        (8730, (0.5, 0.5, 1.0, 0.88 / math.sqrt(2))),
        (8731, (0.5, 0.5, 0.88 / math.sqrt(2), 1.0)),
    ],
)
def test_ssd300_voc_golden_values(voc300: torch.Tensor, index: int, expected: tuple[float, ...]) -> None:
    torch.testing.assert_close(voc300[index], _f32(*expected), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        # 64x64, step 8 -> f_k = 64; s = 35.84/512 = 0.07; s' = sqrt(0.07 * 76.8/512) = sqrt(0.0105)
        (0, (0.5 / 64, 0.5 / 64, 0.07, 0.07)),
        (1, (0.5 / 64, 0.5 / 64, math.sqrt(0.0105), math.sqrt(0.0105))),
        # 32x32, step 16 -> f_k = 32, first box after 16384; s = 76.8/512 = 0.15
        (16384, (0.5 / 32, 0.5 / 32, 0.15, 0.15)),
        # 1x1, step 512: s = 460.8/512 = 0.9; s' = sqrt(0.9 * 537.6/512) = sqrt(0.945); ar 2: 1.273 -> 1.0
        (24560, (0.5, 0.5, 0.9, 0.9)),
        (24561, (0.5, 0.5, math.sqrt(0.945), math.sqrt(0.945))),
        (24562, (0.5, 0.5, 1.0, 0.9 / math.sqrt(2))),
    ],
)
def test_ssd512_golden_values(index: int, expected: tuple[float, ...]) -> None:
    torch.testing.assert_close(default_boxes(SSD512_VOC)[index], _f32(*expected), rtol=0, atol=1e-7)


def test_centre_clamp_hits_the_10x10_map(voc300: torch.Tensor, coco300: torch.Tensor) -> None:
    ten = slice(SSD300_STARTS[2], SSD300_STARTS[3])
    unclamped = 9.5 / 9.375  # last row / column centre, 1.01333
    # book: 19 locations (last row + last column) x 6 boxes have a centre clamped to exactly 1.0
    assert int((voc300[ten, :2] == 1.0).any(dim=1).sum()) == 114
    assert float(voc300[:, :2].max()) == 1.0
    # torchvision semantics (clamp_centres=False): the same 114 boxes keep 1.0133, nothing else exceeds 1
    over = (coco300[:, :2] > 1.0).any(dim=1)
    clamped = torch.zeros(len(voc300), dtype=torch.bool)
    clamped[ten] = (voc300[ten, :2] == 1.0).any(dim=1)
    assert torch.equal(over, clamped)
    torch.testing.assert_close(float(coco300[ten, 0].max()), unclamped, rtol=0, atol=1e-6)
    # widths are clamped in both: nothing wider than 1
    assert float(coco300[:, 2:].max()) == 1.0 and float(voc300[:, 2:].max()) == 1.0


def test_order_within_location(voc300: torch.Tensor) -> None:
    # [s, s', ar2 wide, ar2 tall, ar3 wide, ar3 tall] at one location of the 19x19 map (i = 4, j = 7)
    start = SSD300_STARTS[1] + (4 * 19 + 7) * 6
    loc = voc300[start : start + 6].double()
    assert torch.equal(loc[:, 0], torch.full((6,), loc[0, 0].item(), dtype=torch.float64))
    torch.testing.assert_close(loc[0, 0].item(), 7.5 / 18.75, rtol=0, atol=1e-7)  # column j -> cx
    torch.testing.assert_close(loc[0, 1].item(), 4.5 / 18.75, rtol=0, atol=1e-7)  # row i -> cy
    w, h = loc[:, 2], loc[:, 3]
    assert w[0] == h[0] and w[1] == h[1] and w[1] > w[0]  # s then the larger s'
    ratios = (w / h).tolist()
    expected = [1.0, 1.0, 2.0, 0.5, 3.0, 1 / 3]
    assert ratios == pytest.approx(expected, rel=1e-6)


def test_matches_book_loop_implementation(voc300: torch.Tensor) -> None:
    c = SSD300_VOC
    book = book_dbox_list(c.input_size, c.feature_maps, c.steps, c.min_sizes, c.max_sizes, c.aspect_ratios)
    assert torch.equal(voc300, book)
    c = SSD512_VOC
    book = book_dbox_list(c.input_size, c.feature_maps, c.steps, c.min_sizes, c.max_sizes, c.aspect_ratios)
    assert torch.equal(default_boxes(SSD512_VOC), book)


def _torchvision_boxes(config: SSDConfig, scales: list[float]) -> torch.Tensor:
    """torchvision's DefaultBoxGenerator output for the config, back to normalised (cx, cy, w, h)."""
    ratios = [list(ar) for ar in config.aspect_ratios]
    gen = DefaultBoxGenerator(ratios, scales=scales, steps=list(config.steps))
    size = config.input_size
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    maps = [torch.zeros(1, 1, f, f) for f in config.feature_maps]
    xyxy = gen(images, maps)[0] / size
    return torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), dim=1)


def test_coco_boxes_equal_torchvision(coco300: torch.Tensor) -> None:
    # torchvision ssd300_vgg16's generator (detection/ssd.py)
    tv = _torchvision_boxes(SSD300_COCO, [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
    torch.testing.assert_close(coco300, tv, rtol=0, atol=1e-6)


def test_voc_boxes_equal_torchvision_with_book_scales_and_centre_clamp(voc300: torch.Tensor) -> None:
    # spec 3.3: the book's scales in torchvision's generator, then the book's extra clamp of the centres
    tv = _torchvision_boxes(SSD300_VOC, [s / 300 for s in (30, 60, 111, 162, 213, 264, 315)])
    torch.testing.assert_close(voc300, tv.clamp(0, 1), rtol=0, atol=1e-6)
    assert not torch.allclose(voc300, tv, rtol=0, atol=1e-3)  # without the centre clamp they differ
