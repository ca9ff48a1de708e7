"""JPEGs decoded as tensors where the model runs (``decode_jpegs``, ``from_uint8``,
``apply_exif_orientation``, ``Predictor.preprocess_jpegs``), checked against the PIL path on the CPU.

On CUDA the decoder is nvJPEG (batched); the same code runs here with torchvision's CPU decoder, so
everything but the decoder itself is exercised. ``test_cuda_decode_matches_the_cpu`` runs on a GPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from models import ModelSpec, load_model
from models.preprocess import (
    IMAGENET_STD,
    ClassifierTransform,
    SSDTransform,
    apply_exif_orientation,
    decode_jpegs,
)


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **options)
    return buffer.getvalue()


def _pil_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_decoded_pixels_equal_pil(china: Image.Image) -> None:
    data = _jpeg(china)
    (tensor,) = decode_jpegs([data], "cpu")
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, china.height, china.width)
    assert torch.equal(tensor.permute(1, 2, 0), torch.from_numpy(np.asarray(_pil_rgb(data))))


def test_grey_jpeg_decodes_to_three_equal_channels() -> None:
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), "L")
    (tensor,) = decode_jpegs([_jpeg(grey)], "cpu")
    assert tuple(tensor.shape) == (3, 48, 64)
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_one_corrupt_jpeg_fails_the_decoder_call() -> None:
    good = _jpeg(Image.new("RGB", (32, 24), (200, 30, 30)))
    start = good.index(b"\xff\xda")  # start of scan: its first component id -> one that does not exist
    bad = bytearray(good)
    bad[start + 5] = 0x09
    with pytest.raises(RuntimeError):
        decode_jpegs([good, bytes(bad)], "cpu")
    assert decode_jpegs([], "cpu") == []


def test_ssd_tensor_path_equals_the_pil_path(china: Image.Image) -> None:
    data = _jpeg(china)
    transform = SSDTransform(300)
    (tensor,) = decode_jpegs([data], "cpu")
    assert torch.equal(transform.from_uint8(tensor), transform(_pil_rgb(data)))


@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (224, 224), (64, 64)])
def test_classifier_tensor_path_within_one_grey_level(china: Image.Image, resize: int, crop: int) -> None:
    data = _jpeg(china)
    transform = ClassifierTransform(resize, crop)
    (tensor,) = decode_jpegs([data], "cpu")
    got, want = transform.from_uint8(tensor), transform(_pil_rgb(data))
    assert got.shape == want.shape == (3, crop, crop)
    grey_levels = (got - want).abs() * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # back to 0-255
    assert float(grey_levels.max()) <= 1.0 + 1e-3
    assert float(grey_levels.mean()) < 0.2


def test_elongated_images_stay_on_the_pil_path() -> None:
    transform = ClassifierTransform(256, 224)
    assert transform.tensor_path_ok(640, 480) and transform.tensor_path_ok(480, 640)
    assert not transform.tensor_path_ok(4000, 1) and not transform.tensor_path_ok(1, 4000)
    assert SSDTransform(300).tensor_path_ok(4000, 1)
    with pytest.raises(ValueError, match="uint8"):
        transform.from_uint8(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("orientation", range(0, 10))
def test_exif_orientation_matches_pil(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8))  # 7 wide, 5 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif.tobytes())  # lossless, so pixels compare exactly
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    tensor = torch.from_numpy(np.array(stored)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    assert np.array_equal(apply_exif_orientation(tensor, orientation).permute(1, 2, 0).numpy(), shown)


@pytest.mark.parametrize("key", ["tv_vgg16", "tv_ssd300"])
def test_predictor_preprocess_jpegs_batches_in_order(
    tiny: dict[str, Path], key: str, china: Image.Image
) -> None:
    task, fmt = ("classify", "torchvision") if key == "tv_vgg16" else ("detect", "torchvision")
    arch = "vgg16" if task == "classify" else "ssd300"
    predictor = load_model(ModelSpec(name="p", task=task, arch=arch, format=fmt, weights=tiny[key]))
    small = china.resize((160, 120))
    mirrored = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    files = [_jpeg(small), _jpeg(small), _jpeg(mirrored)]
    batch = predictor.preprocess_jpegs(files, [1, 2, 1])  # the second shown mirrored
    height, width = predictor.transform.input_size
    assert batch.shape == (3, 3, height, width) and batch.dtype == torch.float32
    reference = torch.stack([predictor.preprocess(_pil_rgb(f)) for f in files])
    atol = 0.02 if task == "classify" else 1e-4  # one grey level after normalising; SSD: exact
    assert torch.allclose(batch[0], reference[0], atol=atol)
    assert torch.allclose(batch[2], reference[2], atol=atol)
    # orientation 2 mirrors the stored picture, which the third file stores already mirrored (JPEG
    # re-encoding differs a little): much closer to it than to the unmirrored one
    mirror_diff = float((batch[1] - batch[2]).abs().mean())
    assert mirror_diff < 0.1 * float((batch[1] - batch[0]).abs().mean())
    with pytest.raises(ValueError, match="one orientation per JPEG"):
        predictor.preprocess_jpegs(files, [1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_matches_the_cpu(china: Image.Image) -> None:
    files = [_jpeg(china), _jpeg(china.resize((300, 200)))]
    on_gpu = decode_jpegs(files, "cuda")
    on_cpu = decode_jpegs(files, "cpu")
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few grey levels at most
        assert float((gpu.cpu().float() - cpu.float()).abs().mean()) < 1.5
