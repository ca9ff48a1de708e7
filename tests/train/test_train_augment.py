"""train.augment: boxes stay consistent with the pixels through every augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from train.augment import (
    SAMPLE_CROP_MODES,
    expand,
    mirror,
    photometric_distort,
    random_sample_crop,
    ssd_train_augment,
)

RED, BLUE = (255.0, 0.0, 0.0), (0.0, 0.0, 255.0)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 120 x 160 grey image with a filled red and a filled blue rectangle; boxes in pixel edges."""
    image = np.full((120, 160, 3), 90.0, dtype=np.float32)
    boxes = np.array([[10, 20, 60, 70], [70, 40, 150, 110]], dtype=np.float32)
    for (x1, y1, x2, y2), colour in zip(boxes.astype(int), (RED, BLUE), strict=True):
        image[y1:y2, x1:x2] = colour
    return image, boxes, np.array([0, 1])


def _pixel_box(image: np.ndarray, colour: tuple[float, float, float]) -> list[float] | None:
    ys, xs = np.nonzero((image == np.asarray(colour, dtype=np.float32)).all(axis=-1))
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _geometric(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, boxes, labels = expand(image, boxes, labels, rng)
    image, boxes, labels = random_sample_crop(image, boxes, labels, rng)
    return mirror(image, boxes, labels, rng)


def test_geometric_augmentations_keep_each_box_on_its_coloured_pixels() -> None:
    kinds = set()
    for seed in range(200):
        image, boxes, labels = _scene()
        out, out_boxes, out_labels = _geometric(image, boxes, labels, np.random.default_rng(seed))
        kinds.add((out.shape != image.shape, len(out_labels)))
        assert out.dtype == np.float32 and out_boxes.shape == (len(out_labels), 4)
        height, width = out.shape[:2]
        assert (out_boxes[:, :2] >= 0).all()
        assert (out_boxes[:, 2] <= width).all() and (out_boxes[:, 3] <= height).all()
        assert (out_boxes[:, 2:] > out_boxes[:, :2]).all()
        for box, label in zip(out_boxes, out_labels, strict=True):
            # the rectangle's visible pixels are exactly the box (integer shifts, crops and flips)
            assert _pixel_box(out, (RED, BLUE)[label]) == pytest.approx(box.tolist(), abs=1e-4), seed
    # the run met both zoom directions and dropped boxes at least once
    assert any(changed for changed, _ in kinds) and any(n < 2 for _, n in kinds)


def test_expand_fills_with_the_ssd_pixel_mean_and_mirror_flips_boxes() -> None:
    from models.preprocess import SSD_PIXEL_MEAN_RGB

    image, boxes, labels = _scene()
    big, big_boxes, _ = expand(image, boxes, labels, np.random.default_rng(0), p=1.0)
    assert big.shape[0] > image.shape[0] and big.shape[1] > image.shape[1]
    left, top = (big_boxes[0, :2] - boxes[0, :2]).astype(int)  # where the image went
    height, width = image.shape[:2]
    np.testing.assert_array_equal(big[top : top + height, left : left + width], image)
    outside = np.ones(big.shape[:2], dtype=bool)
    outside[top : top + height, left : left + width] = False
    assert (big[outside] == np.asarray(SSD_PIXEL_MEAN_RGB, dtype=np.float32)).all()
    assert _pixel_box(big, RED) == big_boxes[0].tolist()
    flipped, flipped_boxes, _ = mirror(image, boxes, labels, np.random.default_rng(0), p=1.0)
    assert flipped_boxes[0].tolist() == [160 - 60, 20, 160 - 10, 70]
    assert _pixel_box(flipped, BLUE) == flipped_boxes[1].tolist()


def test_random_sample_crop_meets_the_overlap_constraint() -> None:
    # pixel (x, y) holds (x, y, 0), so the crop's origin can be read off its first pixel
    ys, xs = np.mgrid[0:200, 0:250]
    image = np.stack((xs, ys, np.zeros_like(xs)), axis=-1).astype(np.float32)
    boxes = np.array([[20, 30, 120, 150], [150, 20, 240, 90]], dtype=np.float32)
    labels = np.array([0, 1])
    for min_iou in (0.3, 0.7, 0.9):
        for seed in range(40):
            out, out_boxes, out_labels = random_sample_crop(
                image, boxes, labels, np.random.default_rng(seed), modes=[(min_iou, float("inf"))]
            )
            if out.shape == image.shape:
                continue  # no patch found in the allowed rounds: unchanged
            left, top = out[0, 0, 0], out[0, 0, 1]
            rect = np.array([left, top, left + out.shape[1], top + out.shape[0]])
            inter = np.clip(np.minimum(boxes[:, 2:], rect[2:]) - np.maximum(boxes[:, :2], rect[:2]), 0, None)
            inter_area = inter.prod(axis=1)
            union = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1) + (rect[2:] - rect[:2]).prod() - inter_area
            assert (inter_area / union).max() >= min_iou, (min_iou, seed)
            assert 0.5 <= out.shape[0] / out.shape[1] <= 2
            # kept boxes: those whose centre is inside, clipped to the patch, in its coordinates
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = ((centres > rect[:2]) & (centres < rect[2:])).all(axis=1)
            clipped = np.concatenate(
                (np.maximum(boxes[inside, :2], rect[:2]), np.minimum(boxes[inside, 2:], rect[2:])), axis=1
            )
            expected = clipped - np.tile(rect[:2], 2)
            np.testing.assert_allclose(out_boxes, expected)
            assert out_labels.tolist() == labels[inside].tolist()


def test_sample_crop_modes_are_numpy2_safe_and_none_keeps_the_image() -> None:
    image, boxes, labels = _scene()
    assert SAMPLE_CROP_MODES[0] is None and len(SAMPLE_CROP_MODES) == 6
    same = random_sample_crop(image, boxes, labels, np.random.default_rng(0), modes=[None])
    assert same[0] is image and same[1] is boxes


def test_photometric_distortion_is_per_pixel_colour_only() -> None:
    image, boxes, labels = _scene()
    for seed in range(30):
        out, out_boxes, out_labels = photometric_distort(image, boxes, labels, np.random.default_rng(seed))
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
        assert out_boxes is boxes and out_labels is labels
        # equal input colours give equal output colours: each rectangle stays one uniform patch
        for x1, y1, x2, y2 in boxes.astype(int):
            patch = out[y1:y2, x1:x2].reshape(-1, 3)
            assert np.ptp(patch, axis=0).max() < 1e-3


def test_hsv_stage_keeps_colours_at_identity_and_greys_at_zero_saturation() -> None:
    from train.augment import _hsv_stage

    rgb = np.random.default_rng(0).uniform(0, 255, size=(20, 25, 3)).astype(np.float32)
    assert _hsv_stage(rgb, None, None) is rgb
    same = _hsv_stage(rgb, 1.0, 0.0)
    assert np.abs(same - rgb).max() <= 8  # 8-bit HSV round trip
    grey = _hsv_stage(rgb, 0.0, None)
    assert np.ptp(grey, axis=-1).max() == 0 and np.abs(grey[..., 0] - rgb.max(axis=-1)).max() <= 1  # V kept
    turned = _hsv_stage(np.array([[[255.0, 0.0, 0.0]]], dtype=np.float32), None, 120.0)  # red -> green
    assert turned[0, 0, 1] > 240 and turned[0, 0, [0, 2]].max() < 16


def test_full_pipeline_runs_and_keeps_boxes_inside() -> None:
    image, boxes, labels = _scene()
    for seed in range(20):
        out, out_boxes, out_labels = ssd_train_augment(image, boxes, labels, np.random.default_rng(seed))
        height, width = out.shape[:2]
        assert len(out_labels) >= 1 and (out_boxes[:, 2:] > out_boxes[:, :2]).all()
        assert (out_boxes >= 0).all()
        assert (out_boxes[:, [0, 2]] <= width).all() and (out_boxes[:, [1, 3]] <= height).all()
