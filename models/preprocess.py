"""Image preprocessing: the only place that holds the normalisation constants.

Two transforms, each PIL RGB image -> FloatTensor[3, H, W] on the CPU:

- :class:`ClassifierTransform` (VGG16): shorter side to ``resize`` with PIL bilinear, centre crop
  ``crop``, scale to [0, 1], ImageNet mean/std. torchvision's ImageNet preset is (256, 224)
  (``VGG16_Weights.IMAGENET1K_V1.transforms()``); the book's chapter 1 ``BaseTransform`` /
  ``ImageTransform('val')`` is (224, 224).
- :class:`SSDTransform` (SSD300/512): float32 0-255 pixels, bilinear resize to ``size`` x ``size``
  without antialias, minus the per-channel pixel mean; no division by 255.

Callers convert to RGB first (``image.convert("RGB")``): the book breaks on "L" and "RGBA" images.

The same two transforms also run on decoded uint8 tensors on any device (``from_uint8``), for JPEGs
decoded where the model runs (:func:`decode_jpegs`: nvJPEG on a GPU, batched; libjpeg-turbo on the
CPU), with the EXIF orientation applied on the tensor (:func:`apply_exif_orientation`). On the CPU
this path reproduces the PIL path exactly for SSD and within one grey level (antialiased tensor
resize vs PIL's bilinear) for the classifier; nvJPEG's IDCT differs from libjpeg-turbo's by a
grey level or two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

#: ImageNet channel mean and std in RGB order, for inputs scaled to [0, 1]: torchvision's
#: ``ImageClassification`` preset (``transforms/_presets.py``) and the book's chapter 1 (1-1 nb#10).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: SSD pixel mean on 0-255 inputs in RGB order. The book and ssd.pytorch subtract (104, 117, 123)
#: from cv2's BGR image (``SubtractMeans``, ``ssd_predict_show.py``), then swap to RGB, so the
#: network sees (R - 123, G - 117, B - 104). torchvision's ``ssd300_vgg16`` normalises [0, 1] RGB
#: with mean (0.48235, 0.45882, 0.40784) and std 1/255, i.e. x*255 - (123, 117, 104) to 1e-3.
SSD_PIXEL_MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)
SSD_PIXEL_MEAN_RGB: tuple[float, float, float] = SSD_PIXEL_MEAN_BGR[::-1]

#: A classifier image whose resized long side exceeds this many crop sizes is resized only where the
#: centre crop keeps it (``ClassifierTransform``), so an extreme strip cannot allocate gigabytes.
ELONGATED_FACTOR = 16

#: Named classifier presets (resize, crop).
TORCHVISION_CLASSIFIER_PRESET: tuple[int, int] = (256, 224)
BOOK_CLASSIFIER_PRESET: tuple[int, int] = (224, 224)


def _check_rgb(image: Image.Image) -> None:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB PIL image, got mode {image.mode!r}; convert('RGB') it first")


class ClassifierTransform:
    """PIL RGB image -> FloatTensor[3, crop, crop], ImageNet-normalised.

    The shorter side becomes ``resize`` (the long side ``int(resize * long / short)``) with PIL's
    bilinear filter, as ``torchvision.transforms.Resize(int)`` does on a PIL image; then a centre
    crop of ``crop`` (torchvision's rounding, zero padding if the image is smaller).
    """

    def __init__(self, resize: int, crop: int) -> None:
        if resize < 1 or crop < 1:
            raise ValueError(f"resize and crop must be positive, got resize={resize}, crop={crop}")
        self.resize = resize
        self.crop = crop
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}  # (mean, std) per device

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this transform makes."""
        return (self.crop, self.crop)

    def __call__(self, image: Image.Image) -> Tensor:
        _check_rgb(image)
        width, height = image.size
        long_side = int(self.resize * max(width, height) / min(width, height))  # torchvision's rounding
        if long_side > ELONGATED_FACTOR * max(self.resize, self.crop):
            image = self._resize_cropping_long_side(image, long_side)
        else:
            image = TF.resize(image, [self.resize], interpolation=InterpolationMode.BILINEAR)
        image = TF.center_crop(image, [self.crop])
        x: Tensor = TF.pil_to_tensor(image).to(torch.float32).div_(255.0)  # uint8 (3, crop, crop) -> [0, 1]
        return x.sub_(self._mean).div_(self._std)

    def tensor_path_ok(self, width: int, height: int) -> bool:
        """Whether :meth:`from_uint8` takes a (width x height) image: not the extreme strips that the
        PIL path resizes crop-first (those stay on the PIL path)."""
        long_side = int(self.resize * max(width, height) / max(1, min(width, height)))
        return long_side <= ELONGATED_FACTOR * max(self.resize, self.crop)

    def from_uint8(self, image: Tensor) -> Tensor:
        """uint8 (3, H, W) RGB on any device -> FloatTensor[3, crop, crop] on that device: the same
        steps as ``__call__`` with torchvision's antialiased bilinear tensor resize (uint8 in, uint8
        out, like PIL's), within one grey level of the PIL path."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 tensor (3, H, W), got {image.dtype} {list(image.shape)}")
        resized = TF.resize(image, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        cropped: Tensor = TF.center_crop(resized, [self.crop])
        if image.device not in self._on_device:  # copied once per device, not once per image
            self._on_device[image.device] = (self._mean.to(image.device), self._std.to(image.device))
        mean, std = self._on_device[image.device]
        return cropped.to(torch.float32).div_(255.0).sub_(mean).div_(std)

    def _resize_cropping_long_side(self, image: Image.Image, long_side: int) -> Image.Image:
        """Resize only the part of the long side that the centre crop keeps.

        Resizing a 4000x1 strip's shorter side to 256 first would allocate 1,024,000x256 pixels
        (gigabytes) to keep 224 columns of them. Here PIL resamples just the source span that maps to
        the crop window along the long side (``resize(box=...)``, same sampling positions; within one
        grey level of resize-then-crop), and the short side is resized as usual.
        """
        width, height = image.size
        keep = min(self.crop, long_side)
        start = round((long_side - keep) / 2.0)  # torchvision center_crop's offset
        if width >= height:
            scale = width / long_side
            box = (start * scale, 0.0, (start + keep) * scale, float(height))
            return image.resize((keep, self.resize), Image.Resampling.BILINEAR, box=box)
        scale = height / long_side
        box = (0.0, start * scale, float(width), (start + keep) * scale)
        return image.resize((self.resize, keep), Image.Resampling.BILINEAR, box=box)

    def __repr__(self) -> str:
        return f"ClassifierTransform(resize={self.resize}, crop={self.crop})"


class SSDTransform:
    """PIL RGB image -> FloatTensor[3, size, size] of (pixel - SSD_PIXEL_MEAN_RGB), 0-255 scale.

    The book resizes the float32 image with ``cv2.resize`` (INTER_LINEAR, no antialias) and then
    subtracts the mean; ``F.interpolate(bilinear, align_corners=False, antialias=False)`` computes
    the same half-pixel bilinear weights (within 0.01 grey level of cv2). The aspect ratio is not
    kept and nothing is padded.

    torchvision's SSD (normalise with mean (0.48235, 0.45882, 0.40784) and std 1/255, then the
    same interpolate) gives the same numbers: bilinear weights sum to one, so subtracting a
    per-channel constant commutes with the resize, and its mean times 255 is (123, 117, 104) to
    within 1e-3. One transform therefore serves both formats.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self._mean = torch.tensor(SSD_PIXEL_MEAN_RGB).view(1, 3, 1, 1)
        self._on_device: dict[torch.device, Tensor] = {}  # the mean per device

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this transform makes."""
        return (self.size, self.size)

    def __call__(self, image: Image.Image) -> Tensor:
        _check_rgb(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (H, W, 3) 0-255
        x = pixels.permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)
        size = (self.size, self.size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return (x - self._mean)[0].contiguous()

    def tensor_path_ok(self, width: int, height: int) -> bool:
        """Every size takes the tensor path: the resize goes straight to ``size`` x ``size``."""
        return True

    def from_uint8(self, image: Tensor) -> Tensor:
        """uint8 (3, H, W) RGB on any device -> FloatTensor[3, size, size] on that device: exactly
        ``__call__``'s steps on the tensor."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 tensor (3, H, W), got {image.dtype} {list(image.shape)}")
        x = image.to(torch.float32).unsqueeze(0)  # (3, H, W) -> (1, 3, H, W), 0-255
        size = (self.size, self.size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        if image.device not in self._on_device:  # copied once per device, not once per image
            self._on_device[image.device] = self._mean.to(image.device)
        return (x - self._on_device[image.device])[0].contiguous()

    def __repr__(self) -> str:
        return f"SSDTransform(size={self.size})"


def apply_exif_orientation(image: Tensor, orientation: int) -> Tensor:
    """(C, H, W) as stored -> as displayed, for EXIF Orientation 1-8, the tensor twin of
    ``PIL.ImageOps.exif_transpose``. Other values leave the image as stored (as PIL does)."""
    if orientation == 2:  # mirrored left-right
        return image.flip(-1)
    if orientation == 3:  # rotated 180
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored top-bottom
        return image.flip(-2)
    if orientation == 5:  # transposed (x <-> y)
        return image.transpose(-2, -1)
    if orientation == 6:  # stored 90 degrees anticlockwise: turn it clockwise
        return torch.rot90(image, k=-1, dims=(-2, -1))
    if orientation == 7:  # transversed
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # stored 90 degrees clockwise: turn it anticlockwise
        return torch.rot90(image, k=1, dims=(-2, -1))
    return image


def decode_jpegs(encoded: Sequence[bytes], device: torch.device | str) -> list[Tensor]:
    """JPEG files -> uint8 RGB tensors (3, H, W) on ``device``, as stored (no EXIF orientation).

    On CUDA all of them go to nvJPEG in one batched call (``torchvision.io.decode_jpeg`` with a
    list); on the CPU torchvision's libjpeg-turbo decodes them. Grey JPEGs come back as RGB.
    Raises RuntimeError (or ValueError) when any of them cannot be decoded: the caller decides
    what to do with the batch (the service decodes those images again with PIL, one by one).
    """
    if not encoded:
        return []
    data = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in encoded]
    target = torch.device(device)
    if target.type == "cuda":
        # torchvision's CUDA decoder writes its outputs from a stream of its own without waiting for
        # the caller's (pytorch/vision PR 9606): memory freed by kernels still queued could be
        # overwritten. Waiting here for the caller's stream (idle between batches) rules that out.
        torch.cuda.current_stream(target).synchronize()
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=target)
    return list(decoded)


def calibration_batches(
    images: Sequence[Image.Image], preprocess: Callable[[Image.Image], Tensor], batch_size: int = 8
) -> list[Tensor]:
    """Preprocess ``images`` (converted to RGB first) and stack them into batches of ``batch_size``
    (the last one may be smaller): -> list of FloatTensor[b, 3, H, W], in the images' order.

    Raises ValueError when there are no images or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("no calibration images: int8 needs images of the model's own kind to calibrate on")
    tensors = [preprocess(im if im.mode == "RGB" else im.convert("RGB")) for im in images]
    return [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
