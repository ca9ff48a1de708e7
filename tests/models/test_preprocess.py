"""Preprocessing: classifier presets equal torchvision's transforms; SSDTransform gives the book's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.models import VGG16_Weights
from torchvision.models.detection import ssd300_vgg16
from torchvision.transforms.functional import to_tensor

from models.preprocess import (
    BOOK_CLASSIFIER_PRESET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SSD_PIXEL_MEAN_BGR,
    SSD_PIXEL_MEAN_RGB,
    TORCHVISION_CLASSIFIER_PRESET,
    ClassifierTransform,
    SSDTransform,
)


def _book_base_transform(resize: int, crop: int) -> T.Compose:
    """The book's BaseTransform / ImageTransform('val') (chapter 1) written with torchvision."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize])


def test_constants_match_their_sources() -> None:
    preset = VGG16_Weights.IMAGENET1K_V1.transforms()
    assert tuple(preset.mean) == IMAGENET_MEAN and tuple(preset.std) == IMAGENET_STD
    assert (preset.resize_size[0], preset.crop_size[0]) == TORCHVISION_CLASSIFIER_PRESET == (256, 224)
    assert BOOK_CLASSIFIER_PRESET == (224, 224)
    assert SSD_PIXEL_MEAN_BGR == (104.0, 117.0, 123.0)
    assert SSD_PIXEL_MEAN_RGB == (123.0, 117.0, 104.0)


@pytest.mark.parametrize("image_name", ["china", "portrait"])
def test_classifier_transform_equals_torchvision_preset(
    image_name: str, request: pytest.FixtureRequest
) -> None:
    image: Image.Image = request.getfixturevalue(image_name)
    ours = ClassifierTransform(*TORCHVISION_CLASSIFIER_PRESET)(image)
    theirs = VGG16_Weights.IMAGENET1K_V1.transforms()(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("image_name", ["china", "portrait"])
def test_classifier_transform_equals_book_transform(image_name: str, request: pytest.FixtureRequest) -> None:
    image: Image.Image = request.getfixturevalue(image_name)
    ours = ClassifierTransform(*BOOK_CLASSIFIER_PRESET)(image)
    assert torch.equal(ours, _book_base_transform(224, 224)(image))


def test_classifier_transform_resizes_the_shorter_side_then_crops_centre(portrait: Image.Image) -> None:
    # a crop larger than the resized image is zero-padded before normalising, as CenterCrop does
    small = ClassifierTransform(resize=100, crop=128)(portrait)
    assert torch.equal(small, _book_base_transform(100, 128)(portrait))
    corner = small[:, 0, 0]  # padding: black pixels normalised
    expected = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).float()
    torch.testing.assert_close(corner, expected)


def _bilinear_half_pixel(image: np.ndarray, size: int) -> np.ndarray:
    """Direct float64 bilinear resize with half-pixel centres (cv2 INTER_LINEAR / align_corners=False)."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    h, w = image.shape[:2]
    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


@pytest.mark.parametrize("size", [300, 512])
def test_ssd_transform_equals_direct_float_computation(china: Image.Image, size: int) -> None:
    out = SSDTransform(size)(china)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    # the book: float32 BGR image, resize, minus (104, 117, 123) in BGR, then to RGB CHW
    bgr = np.asarray(china)[:, :, ::-1]
    expected_bgr = _bilinear_half_pixel(bgr, size) - np.array(SSD_PIXEL_MEAN_BGR)
    expected = torch.from_numpy(expected_bgr[:, :, ::-1].copy()).permute(2, 0, 1)
    diff = (out.double() - expected).abs().max().item()
    # interpolate computes source coordinates (up to ~640) in float32, about 3e-5 px off; times a
    # neighbour difference of up to 255 levels that is ~0.01 level (cv2's fixed-point weights: 0.0098)
    assert diff < 0.01, f"max difference {diff} grey levels"
    # no /255: values span the pixel range minus the mean
    assert out.max() > 100 and out.min() < -100


def test_ssd_transform_equals_torchvision_ssd_normalisation(china: Image.Image) -> None:
    """torchvision's SSD transform (normalise [0, 1] input with its mean and std 1/255, then resize)
    gives the same tensor as SSDTransform, which is why one transform serves both formats."""
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).eval()
    images, _ = tv.transform([to_tensor(china)])
    theirs = images.tensors[0]
    ours = SSDTransform(300)(china)
    assert theirs.shape == ours.shape
    diff = (theirs - ours).abs().max().item()
    assert diff < 5e-3, f"max difference {diff} grey levels"


def test_transforms_refuse_non_rgb_images(china: Image.Image) -> None:
    for mode in ("L", "RGBA"):
        img = china.convert(mode)
        with pytest.raises(ValueError, match="RGB"):
            ClassifierTransform(256, 224)(img)
        with pytest.raises(ValueError, match="RGB"):
            SSDTransform(300)(img)


@pytest.mark.parametrize(
    ("size", "resize", "crop"), [((6000, 40), 256, 224), ((30, 5000), 224, 224), ((5000, 30), 100, 128)]
)
def test_elongated_images_match_resize_then_crop_without_the_huge_intermediate(
    size: tuple[int, int], resize: int, crop: int
) -> None:
    # 6000x40 -> 38400x256 if resized whole: the transform resamples only the cropped span instead
    pixels = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours = ClassifierTransform(resize, crop)(image)
    reference = _book_base_transform(resize, crop)(image)
    assert ours.shape == reference.shape == (3, crop, crop)
    # one grey level after normalisation is 1/255/0.225 = 0.0175
    assert (ours - reference).abs().max().item() <= 1.0 / 255 / min(IMAGENET_STD) + 1e-6


def test_a_strip_of_a_few_bytes_does_not_allocate_gigabytes() -> None:
    strip = Image.new("RGB", (4_000_000, 1), (200, 10, 10))  # resizing it whole: 1e9 x 256 pixels
    out = ClassifierTransform(256, 224)(strip)
    assert out.shape == (3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (torch.tensor([200.0, 10.0, 10.0]) / 255 - mean) / std
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-5)
