"""SSD post-processing: decode, the book's Detect semantics on hand-made head outputs, agreement with a loop
reference of the book's code and with torchvision's ssd300_vgg16, and reduced-precision inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import batched_nms

from models.anchors import default_boxes
from models.detect import (
    BOOK_POSTPROCESS,
    TORCHVISION_POSTPROCESS,
    PostprocessConfig,
    decode,
    postprocess,
    select_detections,
)
from models.ssd import SSD, SSD300_COCO, SSD300_VOC, torchvision_to_book
from models.types import DetectOutput, DetectParams
from tests.models.ssd_reference import book_detect, book_nm_suppression, init_random_

ALL = DetectParams(score_threshold=0.0, iou_threshold=None, max_detections=None)  # report everything
U = 1 / 64  # a dyadic unit: boxes built from it decode and intersect without rounding


def _head(
    boxes: Sequence[Sequence[float]], probs: Sequence[Sequence[float]], batch: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-made head outputs whose decoded boxes are ``boxes`` (xyxy, normalised) and whose softmax
    scores are ``probs`` (one row per anchor, class 0 = background): loc = 0, priors = the boxes,
    logits = log(probs). Returns (loc [B, A, 4], conf [B, A, C], priors [A, 4])."""
    b = torch.tensor(boxes, dtype=torch.float64)
    priors = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), dim=1).float()
    conf = torch.tensor(probs, dtype=torch.float64).log().float()
    return torch.zeros(batch, len(b), 4), conf.expand(batch, -1, -1).clone(), priors


def _grid_boxes(n: int) -> list[list[float]]:
    """n disjoint boxes of side 1/32 on a 16-wide grid with spacing 1/16."""
    corners = [((i % 16) / 16, (i // 16) / 16) for i in range(n)]
    return [[x, y, x + 1 / 32, y + 1 / 32] for x, y in corners]


def _one(outputs: list[DetectOutput]) -> DetectOutput:
    assert len(outputs) == 1
    return outputs[0]


# --- decode -----------------------------------------------------------------------------------------------


def test_decode_hand_values() -> None:
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    # dcx = 1 -> cx = 0.5 + 1*0.1*0.2 = 0.52; dcy = -2 -> cy = 0.5 - 2*0.1*0.4 = 0.42
    # dw = 5 ln 2 -> w = 0.2 * exp(0.2 * 5 ln 2) = 0.4; dh = 0 -> h = 0.4
    loc = torch.tensor([[[1.0, -2.0, 5 * math.log(2), 0.0]]])
    expected = torch.tensor([[[0.52 - 0.2, 0.42 - 0.2, 0.52 + 0.2, 0.42 + 0.2]]])
    torch.testing.assert_close(decode(loc, priors), expected)
    # zero offsets give the prior itself in corner form; leading batch dims are kept
    zero = decode(torch.zeros(2, 3, 1, 4), priors)
    assert zero.shape == (2, 3, 1, 4)
    torch.testing.assert_close(zero[1, 2, 0], torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_decode_clamp_log_wh() -> None:
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    loc = torch.tensor([[100.0, 0.0, 100.0, 1.0]])
    book = decode(loc, priors)  # no clamp: w = 0.2 * exp(20)
    torch.testing.assert_close(book[0, 2] - book[0, 0], torch.tensor(0.2 * math.exp(20.0)))
    tv = decode(loc, priors, clamp_log_wh=math.log(1000 / 16))  # w = 0.2 * 62.5 = 12.5; h not clamped
    torch.testing.assert_close(tv[0, 2] - tv[0, 0], torch.tensor(12.5))
    torch.testing.assert_close(tv[0, 3] - tv[0, 1], torch.tensor(0.2 * math.exp(0.2)))


# --- book semantics on hand-made head outputs ------------------------------------------------------------


def test_only_top_200_of_a_class_enter_nms() -> None:
    # 250 disjoint candidates of class 1 with distinct scores 0.5, 0.499, ..., 0.251
    scores = [0.5 - i * 0.001 for i in range(250)]
    loc, conf, priors = _head(_grid_boxes(250), [[1 - s, s] for s in scores])
    out = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL]))
    assert len(out.scores) == 200
    torch.testing.assert_close(out.scores, torch.tensor(scores[:200]), rtol=0, atol=1e-6)
    assert out.class_ids.tolist() == [0] * 200
    # a larger per-class pre-NMS budget lets all 250 through
    wide = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL], PostprocessConfig(pre_nms_top_k=400)))
    assert len(wide.scores) == 250


def test_no_overall_cap_by_default() -> None:
    # three classes with 250 disjoint candidates each: 3 x 200 survive, more than 200 for one image
    probs = [[0.1, 0.3 - i * 1e-4, 0.3 - i * 2e-4, 0.3 + i * 1e-4] for i in range(250)]
    loc, conf, priors = _head(_grid_boxes(250), probs)
    out = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL]))
    assert len(out.scores) == 600
    assert torch.bincount(out.class_ids).tolist() == [200, 200, 200]
    assert bool((out.scores[:-1] >= out.scores[1:]).all())  # sorted across classes
    capped = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL], TORCHVISION_POSTPROCESS))
    assert len(capped.scores) == 200
    torch.testing.assert_close(capped.scores, out.scores[:200])


def _iou_pairs() -> tuple[list[list[float]], list[list[float]]]:
    """Three (A, B) pairs, B inside A, side by side along x. B = [0, 0, 3U, 3U] (area 9U²),
    A = [0, 0, 5U, b] with b = 4U, 4U + 2^-24 and 4U - 2^-24: IoU = 9U² / (5U b) = 0.45 exactly,
    0.45 - 5e-7 and 0.45 + 5e-7. A scores 0.6, B 0.3."""
    eps = 2.0**-24
    boxes: list[list[float]] = []
    for shift, b in ((0.0, 4 * U), (0.5, 4 * U + eps), (0.25, 4 * U - eps)):
        boxes += [[shift, 0.0, shift + 5 * U, b], [shift, 0.0, shift + 3 * U, 3 * U]]
    return boxes, [[0.4, 0.6], [0.7, 0.3]] * 3


def test_iou_at_threshold_is_kept() -> None:
    boxes, probs = _iou_pairs()
    a = torch.tensor(boxes)
    ious = [9 * U * U / float((a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])) for i in (0, 2, 4)]
    assert ious[0] == 0.45 and ious[1] < 0.45 < ious[2]
    loc, conf, priors = _head(boxes, probs)
    out = _one(postprocess(loc, conf, priors, [(64, 64)], [ALL]))
    # kept: A1, B1 (IoU exactly 0.45), A2, B2 (just below), A3; B3 (just above) is suppressed
    expected = torch.tensor([boxes[0], boxes[2], boxes[4], boxes[1], boxes[3]]) * 64
    assert len(out.scores) == 5
    assert sorted(out.boxes.tolist()) == sorted(expected.tolist())
    # the book's own loop agrees on the same boxes
    keep = book_nm_suppression(a, torch.tensor([p[1] for p in probs]), overlap=0.45)
    assert sorted(keep) == [0, 1, 2, 3, 4]
    # a stricter per-image threshold suppresses B1 and B2 as well
    strict = DetectParams(score_threshold=0.0, iou_threshold=0.4499, max_detections=None)
    assert len(_one(postprocess(loc, conf, priors, [(64, 64)], [strict])).scores) == 3


def test_score_exactly_at_conf_threshold_is_excluded() -> None:
    # 100 classes: an anchor whose logits are all 0 gives every class exactly 1/100 = 0.01 (float32)
    num_classes = 100
    flat = [1.0 / num_classes] * num_classes
    just_above = [0.9899] + [0.0] * (num_classes - 1)
    just_above[5] = 0.0101
    loc, conf, priors = _head(_grid_boxes(2), [flat, just_above])
    assert torch.equal(F.softmax(conf[0, 0], dim=0), torch.full((num_classes,), 0.01))
    out = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL], class_offset=0))
    assert out.class_ids.tolist() == [5]
    torch.testing.assert_close(out.scores, torch.tensor([0.0101]))
    torch.testing.assert_close(out.boxes, torch.tensor([_grid_boxes(2)[1]]) * 100)


def test_background_is_never_reported() -> None:
    # anchor 0: all background; anchor 1: background and class 1 tie at 0.5; anchor 2: class 2 at 0.9
    loc, conf, priors = _head(_grid_boxes(3), [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.05, 0.05, 0.9]])
    out = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL]))
    # class_offset 1: network classes 1, 2 -> labels 0, 1 (the book's voc_classes[c - 1])
    assert out.class_ids.tolist() == [1, 0, 0]
    torch.testing.assert_close(out.scores, torch.tensor([0.9, 0.5, 0.05]))
    raw = _one(postprocess(loc, conf, priors, [(100, 100)], [ALL], class_offset=0))
    assert raw.class_ids.tolist() == [2, 1, 1] and 0 not in raw.class_ids.tolist()
    assert raw.class_ids.dtype == torch.int64


def test_per_image_parameters_in_one_batch() -> None:
    boxes, probs = _iou_pairs()
    loc, conf, priors = _head(boxes, probs, batch=4)
    params = [
        ALL,  # 5 boxes (see test_iou_at_threshold_is_kept)
        DetectParams(score_threshold=0.5, iou_threshold=None, max_detections=None),  # only the three A's
        DetectParams(score_threshold=0.0, iou_threshold=0.3, max_detections=None),  # B's all suppressed
        DetectParams(score_threshold=0.0, iou_threshold=None, max_detections=2),  # two best
    ]
    outs = postprocess(loc, conf, priors, [(64, 64)] * 4, params)
    assert [len(o.scores) for o in outs] == [5, 3, 3, 2]
    torch.testing.assert_close(outs[1].scores, torch.full((3,), 0.6))
    torch.testing.assert_close(outs[3].scores, torch.full((2,), 0.6))
    # the default DetectParams cap is 100 and its score threshold 0.5
    assert len(_one(postprocess(loc[:1], conf[:1], priors, [(64, 64)], [DetectParams()])).scores) == 3


def test_clip_to_image_drop_empty_and_scale_by_width_height() -> None:
    boxes = [
        [0.25, 0.25, 0.75, 0.5],  # inside
        [-0.25, 0.25, 0.25, 0.75],  # sticks out on the left: clipped
        [1.25, 0.25, 1.75, 0.75],  # entirely right of the image: empty after clipping, dropped
        [0.5, -0.75, 0.75, -0.25],  # entirely above: dropped
        [0.5, 0.75, 1.5, 1.25],  # bottom-right corner: clipped on two sides
    ]
    probs = [[0.1 + 0.1 * i, 0.9 - 0.1 * i] for i in range(5)]
    loc, conf, priors = _head(boxes, probs, batch=2)
    outs = postprocess(loc, conf, priors, [(500, 375), (640, 480)], [ALL, ALL])
    assert len(outs) == 2
    expected_500 = [[125.0, 93.75, 375.0, 187.5], [0.0, 93.75, 125.0, 281.25], [250.0, 281.25, 500.0, 375.0]]
    torch.testing.assert_close(outs[0].boxes, torch.tensor(expected_500))
    expected_640 = [[160.0, 120.0, 480.0, 240.0], [0.0, 120.0, 160.0, 360.0], [320.0, 360.0, 640.0, 480.0]]
    torch.testing.assert_close(outs[1].boxes, torch.tensor(expected_640))
    for out in outs:
        torch.testing.assert_close(out.scores, torch.tensor([0.9, 0.8, 0.5]))
        assert out.boxes.dtype == out.scores.dtype == torch.float32
        assert out.boxes.device.type == "cpu"


def test_nms_never_crosses_classes_or_loses_precision() -> None:
    # boxes with negative corners: torchvision's batched_nms offset trick assumes x1 >= 0, so these two
    # identical-after-offset boxes of classes 1 and 2 would suppress each other without the translation
    boxes = [[0.0, 0.0, 1.0, 1.0], [-2.0, -2.0, -1.0, -1.0]]
    probs = [[0.1, 0.9, 0.0], [0.2, 0.0, 0.8]]
    loc, conf, priors = _head(boxes, probs)
    raw = batched_nms(torch.tensor(boxes), torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), 0.45)
    assert raw.tolist() == [0]  # the hazard is real
    det = select_detections(loc, conf, priors, [0.45])
    assert det.labels.tolist() == [1, 2]
    # one absurd box (an untrained model's exp(60)) in class 2 leaves class 1's 0.45 boundary exact
    pair_boxes, pair_probs = _iou_pairs()
    probs = [[*p, 0.0] for p in pair_probs] + [[0.1, 0.0, 0.9]]
    loc, conf, priors = _head([*pair_boxes, [0.4, 0.4, 0.5, 0.5]], probs)
    loc[0, -1, 2:] = 300.0  # w = h = 0.1 * exp(60)
    det = select_detections(loc, conf, priors, [0.45])
    assert det.labels.tolist().count(1) == 5 and det.labels.tolist().count(2) == 1


# --- agreement with the book's loop code -----------------------------------------------------------------


def _reference_rows(reference: torch.Tensor, image: int) -> torch.Tensor:
    """Rows (class, score, x1, y1, x2, y2) of book_detect's output for one image, nonzero scores only."""
    out = reference[image]  # (C, top_k, 5)
    cls, slot = (out[:, :, 0] > 0).nonzero(as_tuple=True)
    return torch.cat((cls[:, None].float(), out[cls, slot]), dim=1)


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sort rows (class, score, ...) by class, then score descending."""
    order = rows[:, 1].argsort(descending=True, stable=True)
    rows = rows[order]
    return rows[rows[:, 0].argsort(stable=True)]


def test_agrees_with_book_detect_on_random_outputs() -> None:
    gen = torch.Generator().manual_seed(11)
    priors = default_boxes(SSD300_VOC)
    loc = torch.randn(2, len(priors), 4, generator=gen)
    conf = torch.randn(2, len(priors), 21, generator=gen) * 1.5
    reference = book_detect(loc, conf, priors)  # (2, 21, 200, 5)

    # normalised, unclipped: the same detections as the book
    det = select_detections(loc, conf, priors, [0.45, 0.45])
    max_score = max_box = 0.0
    for i in range(2):
        ref = _sorted_rows(_reference_rows(reference, i))
        m = det.image == i
        ours = _sorted_rows(torch.cat((det.labels[m, None].float(), det.scores[m, None], det.boxes[m]), 1))
        assert len(ours) == len(ref) > 1000  # many per image, no overall cap
        assert torch.equal(ours[:, 0], ref[:, 0])
        torch.testing.assert_close(ours[:, 1:], ref[:, 1:], rtol=0, atol=1e-6)

    # through postprocess, in pixels of a 500x375 image: the book's boxes scaled, clipped, empties dropped
    outs = postprocess(loc, conf, priors, [(500, 375)] * 2, [ALL, ALL])
    scale = torch.tensor([500.0, 375.0, 500.0, 375.0])
    for i, out in enumerate(outs):
        ref = _reference_rows(reference, i)
        boxes = torch.minimum((ref[:, 2:] * scale).clamp(min=0), scale)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        ref = _sorted_rows(torch.cat((ref[keep, :2], boxes[keep]), dim=1))
        labels = out.class_ids[:, None].float() + 1  # back to network classes
        ours = _sorted_rows(torch.cat((labels, out.scores[:, None], out.boxes), 1))
        assert len(ours) == len(ref)
        assert torch.equal(ours[:, 0], ref[:, 0])
        max_score = max(max_score, float((ours[:, 1] - ref[:, 1]).abs().max()))
        max_box = max(max_box, float((ours[:, 2:] - ref[:, 2:]).abs().max()))
    assert max_score <= 1e-6 and max_box <= 1e-3
    print(
        f"book reference, 500x375: {[len(o.scores) for o in outs]} detections, "
        f"max score diff {max_score:.3g}, max box diff {max_box:.3g} px"
    )


# --- agreement with torchvision -------------------------------------------------------------------------


def _match(ours: DetectOutput, theirs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Pair every detection of ours with one of torchvision's (same label, nearest box and score); assert
    a one-to-one pairing and return (max score diff, max box diff in pixels)."""
    assert len(ours.scores) == len(theirs["scores"])
    same_label = ours.class_ids[:, None] == theirs["labels"][None, :]
    box_diff = (ours.boxes[:, None, :] - theirs["boxes"][None, :, :]).abs().amax(dim=-1)
    score_diff = (ours.scores[:, None] - theirs["scores"][None, :]).abs()
    cost = torch.where(same_label, box_diff / 1e-2 + score_diff / 1e-4, torch.inf)
    best = cost.argmin(dim=1)
    assert sorted(best.tolist()) == list(range(len(best)))  # a permutation
    rows = torch.arange(len(best))
    return float(score_diff[rows, best].max()), float(box_diff[rows, best].max())


def test_reproduces_torchvision_ssd300_vgg16() -> None:
    num_classes = 91
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    init_random_(tv, seed=5)
    background = 7.0
    with torch.no_grad():  # a quiet background plus a few confident and some middling classes
        for head in tv.head.classification_head.module_list:
            head.weight.mul_(0.2)
            head.bias.view(-1, num_classes)[:, 0] += background
        cls_heads = tv.head.classification_head.module_list
        cls_heads[4].bias.view(4, num_classes)[1, 17] += background + 7  # 3x3 map, 9 overlapping boxes
        cls_heads[3].bias.view(6, num_classes)[2, 3] += background + 4  # 5x5 map
        cls_heads[2].bias.view(6, num_classes)[4, 44] += background - 2  # 10x10 map, scores ~0.1-0.5
        cls_heads[5].bias.view(4, num_classes)[0, 60] += background + 7  # 1x1 map ...
        tv.head.regression_head.module_list[5].bias.view(4, 4)[0, 2] += 30.0  # ... with a very wide box
    ours = SSD(num_classes, SSD300_COCO)
    ours.load_state_dict(torchvision_to_book(tv.state_dict()), strict=True)
    ours.eval()

    gen = torch.Generator().manual_seed(7)
    low = torch.rand(1, 3, 12, 16, generator=gen)
    image = F.interpolate(low, size=(375, 500), mode="bilinear", align_corners=False)[0]  # [0, 1], 500x375
    mean = torch.tensor([123.0, 117.0, 104.0])[:, None, None]
    with torch.no_grad():
        expected = tv([image])[0]
        x = F.interpolate(
            (image * 255 - mean)[None], size=(300, 300), mode="bilinear", align_corners=False, antialias=False
        )
        loc, conf = ours(x)
    scores = F.softmax(conf, dim=-1)[..., 1:]
    assert float((scores - 0.01).abs().min()) > 1e-3  # no candidate sits on the score threshold
    priors = default_boxes(SSD300_COCO)
    out = _one(postprocess(loc, conf, priors, [(500, 375)], [ALL], TORCHVISION_POSTPROCESS, class_offset=0))
    # not vacuous: several confident detections, several classes, some NMS work, a clipped box
    assert int((out.scores > 0.9).sum()) >= 10 and len(set(out.class_ids.tolist())) >= 4
    assert int((scores > 0.01).sum()) > len(out.scores)
    assert bool(((out.boxes[:, 0] == 0) & (out.boxes[:, 2] == 500)).any())
    score_diff, box_diff = _match(out, expected)
    assert score_diff <= 1e-4 and box_diff <= 1e-2
    print(
        f"torchvision: {len(out.scores)} detections, max score diff {score_diff:.3g}, "
        f"max box diff {box_diff:.3g} px"
    )


# --- reduced precision ------------------------------------------------------------------------------------


def test_bf16_forward_and_postprocess() -> None:
    model = SSD(21, SSD300_VOC, width=1 / 16)
    init_random_(model, seed=3)
    model = model.eval().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 300, 300, generator=gen) * 255 - 117).to(torch.bfloat16)
    with torch.no_grad():
        loc, conf = model(x)
    assert loc.dtype == conf.dtype == torch.bfloat16
    assert bool(torch.isfinite(loc).all() and torch.isfinite(conf).all())
    outs = postprocess(loc, conf, default_boxes(SSD300_VOC), [(500, 375), (300, 300)], [ALL, ALL])
    assert len(outs) == 2 and all(len(o.scores) > 0 for o in outs)
    for out, (w, h) in zip(outs, [(500, 375), (300, 300)], strict=True):
        assert out.boxes.dtype == out.scores.dtype == torch.float32
        assert bool((out.boxes >= 0).all() and (out.boxes[:, 2] <= w).all() and (out.boxes[:, 3] <= h).all())


def test_rejects_mismatched_batch() -> None:
    loc, conf, priors = _head(_grid_boxes(2), [[0.5, 0.5], [0.5, 0.5]], batch=2)
    with pytest.raises(ValueError, match="batch of 2"):
        postprocess(loc, conf, priors, [(10, 10)], [ALL, ALL])
    with pytest.raises(ValueError):
        postprocess(loc, conf[:, :1], priors, [(10, 10)] * 2, [ALL, ALL])
    assert PostprocessConfig() == BOOK_POSTPROCESS


# --- CUDA -------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)"
)


@pytest.mark.gpu
@needs_cuda
def test_cuda_postprocess_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(12)
    priors = default_boxes(SSD300_VOC)
    loc = torch.randn(3, len(priors), 4, generator=gen)
    conf = torch.randn(3, len(priors), 21, generator=gen) * 1.5
    params = [ALL, DetectParams(0.2, 0.3, 50), DetectParams(0.0, 0.45, None)]
    sizes = [(500, 375), (640, 480), (300, 300)]
    cpu = postprocess(loc, conf, priors, sizes, params)
    gpu = postprocess(loc.cuda(), conf.cuda(), priors.cuda(), sizes, params)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.boxes.device.type == "cpu" and len(a.scores) == len(b.scores) > 0
        # near-equal scores of different classes may swap places: compare per class, score descending
        rows_a, rows_b = (
            _sorted_rows(torch.cat((o.class_ids[:, None].float(), o.scores[:, None], o.boxes), 1))
            for o in (a, b)
        )
        assert torch.equal(rows_a[:, 0], rows_b[:, 0])
        torch.testing.assert_close(rows_b[:, 1], rows_a[:, 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(rows_b[:, 2:], rows_a[:, 2:], rtol=0, atol=1e-3)
    half = postprocess(loc.cuda().half(), conf.cuda().half(), priors.cuda(), sizes, params)
    assert all(o.scores.dtype == o.boxes.dtype == torch.float32 for o in half)


@pytest.mark.gpu
@needs_cuda
def test_cuda_forward_matches_cpu_and_reduced_precision_runs() -> None:
    model = SSD(21, SSD300_VOC)
    init_random_(model, seed=13)
    model.eval()
    x = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(14)) * 255 - 117
    with torch.no_grad():
        loc, conf = model(x)
        model.cuda()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            loc_gpu, conf_gpu = model(x.cuda())
        for dtype in (torch.bfloat16, torch.float16):
            low = model.to(dtype)(x.cuda().to(dtype))
            assert all(t.dtype == dtype and bool(torch.isfinite(t).all()) for t in low)
            outs = postprocess(*low, default_boxes(SSD300_VOC).cuda(), [(500, 375)] * 2, [ALL, ALL])
            assert all(len(o.scores) > 0 and o.scores.dtype == torch.float32 for o in outs)
            model.float()
    torch.testing.assert_close(loc_gpu.cpu(), loc, rtol=1e-4, atol=1e-4 * float(loc.abs().max()))
    torch.testing.assert_close(conf_gpu.cpu(), conf, rtol=1e-4, atol=1e-4 * float(conf.abs().max()))
