"""app.images.decode_image: formats, modes, EXIF orientation, limits and broken input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngImageFile

from app.errors import ApiError
from app.images import decode_image, to_rgb
from tests.app.harness import serve
from tests.app.helpers import encode, image_in_mode, jpeg, photo, png, png_header_only

BIG = 40_000_000


def code_of(data: bytes, max_pixels: int = BIG) -> tuple[int, str]:
    with pytest.raises(ApiError) as err:
        decode_image(data, max_pixels)
    return err.value.status_code, err.value.code


# (mode, a format that stores it as that mode)
MODE_FILES = [
    ("1", "PNG"),
    ("L", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("PA", "TIFF"),
    ("RGBA", "PNG"),
    ("RGBA", "WEBP"),
    ("CMYK", "JPEG"),
    ("CMYK", "TIFF"),
    ("YCbCr", "TIFF"),
    ("I;16", "PNG"),
    ("I;16B", "TIFF"),
    ("I", "TIFF"),
    ("F", "TIFF"),
    ("RGB", "BMP"),
    ("L", "GIF"),
]


@pytest.mark.parametrize(("mode", "fmt"), MODE_FILES)
def test_every_mode_becomes_rgb_of_the_same_size(mode: str, fmt: str) -> None:
    data = encode(image_in_mode(mode, 40, 30), fmt)
    stored = Image.open(io.BytesIO(data))
    if fmt != "GIF":  # GIF stores L as P
        assert stored.mode == mode, "the test file must really be in this mode"
    image = decode_image(data, BIG)
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_sixteen_bit_grey_is_scaled_to_eight_bits() -> None:
    raw = np.full((3, 4), 0x1234, dtype="<u2")
    image = to_rgb(Image.frombytes("I;16", (4, 3), raw.tobytes()))
    assert np.asarray(image)[0, 0].tolist() == [0x12, 0x12, 0x12]
    decoded = decode_image(encode(Image.frombytes("I;16", (4, 3), raw.tobytes()), "PNG"), BIG)
    assert np.asarray(decoded)[2, 3].tolist() == [0x12, 0x12, 0x12]


def test_thirty_two_bit_grey_is_read_as_sixteen_bit_data() -> None:
    values = np.array([[-5, 256, 65535, 70000]], dtype=np.int32)
    image = to_rgb(Image.fromarray(values))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 255, 255]


def test_float_grey_in_unit_range_is_scaled_to_255() -> None:
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert np.asarray(unit)[0, :, 0].tolist() == [0, 128, 255]
    bytes_range = to_rgb(Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32)))
    assert np.asarray(bytes_range)[0, :, 0].tolist() == [0, 100, 255]


def test_alpha_is_dropped_not_composited() -> None:
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(decode_image(encode(rgba, "PNG"), BIG))[0, 0].tolist() == [10, 20, 30]
    la = Image.new("LA", (2, 2), (100, 0))
    assert np.asarray(decode_image(encode(la, "PNG"), BIG))[1, 1].tolist() == [100, 100, 100]


def test_palette_with_transparency_keeps_the_palette_colour() -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([200, 100, 50] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    decoded = decode_image(encode(image, "PNG", transparency=0), BIG)
    assert np.asarray(decoded)[0, 0].tolist() == [200, 100, 50]


# EXIF 2.3 Orientation: value -> the transpose that displays the stored image
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,  # 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = jpeg(64, 48, orientation=orientation)
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    expected = stored.transpose(ORIENTATIONS[orientation])
    image = decode_image(data, BIG)
    assert image.size == expected.size
    if orientation in (5, 6, 7, 8):
        assert image.size == (48, 64)  # width and height swapped
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_unreadable_exif_leaves_the_image_as_stored() -> None:
    data = encode(photo(32, 16), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert decode_image(data, BIG).size == (32, 16)


def test_first_frame_of_animated_gif_mpo_and_multipage_tiff() -> None:
    extra: dict[str, dict[str, object]] = {"WEBP": {"lossless": True}}
    for fmt in ("GIF", "MPO", "TIFF", "WEBP"):
        red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
        data = encode(red, fmt, save_all=True, append_images=[blue], **extra.get(fmt, {}))
        opened = Image.open(io.BytesIO(data))
        assert opened.format == fmt and getattr(opened, "n_frames", 1) == 2
        r, _g, b = np.asarray(decode_image(data, BIG))[3, 4].tolist()
        assert r > 200 and b < 50, fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_accepted_formats(fmt: str) -> None:
    assert decode_image(encode(photo(20, 10), fmt), BIG).size == (20, 10)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "TGA"])
def test_other_formats_are_unsupported_media(fmt: str) -> None:
    assert code_of(encode(photo(16, 16), fmt)) == (415, "UNSUPPORTED_MEDIA_TYPE")


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text and not an image\n", np.random.default_rng(1).bytes(4096)],
    ids=["empty", "text", "random"],
)
def test_garbage_is_invalid_image(data: bytes) -> None:
    assert code_of(data) == (400, "INVALID_IMAGE")


@pytest.mark.parametrize("make", [lambda: jpeg(128, 96), lambda: png(128, 96)], ids=["jpeg", "png"])
def test_truncated_image_is_invalid(make: object) -> None:
    data = make()  # type: ignore[operator]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert code_of(data[: len(data) // 2]) == (400, "INVALID_IMAGE")


def test_declared_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImageFile, "load", no_decoding)
    bomb = png_header_only(30000, 30000)  # 900 MP (2.7 GB of RGB) in a few dozen bytes
    assert len(bomb) < 200
    assert code_of(bomb) == (413, "IMAGE_TOO_LARGE")
    over_limit = png_header_only(8000, 6000)  # 48 MP: under PIL's own limit, over ours
    assert code_of(over_limit) == (413, "IMAGE_TOO_LARGE")


def test_pixel_limit_is_width_times_height() -> None:
    data = png(64, 48)  # 3072 pixels
    assert code_of(data, max_pixels=3071) == (413, "IMAGE_TOO_LARGE")
    assert decode_image(data, 3072).size == (64, 48)


def test_pils_own_bomb_limit_gives_the_same_answer_with_the_size() -> None:
    bomb = png_header_only(30000, 30000)
    with pytest.raises(ApiError) as err:
        decode_image(bomb, BIG)
    assert (err.value.status_code, err.value.code) == (413, "IMAGE_TOO_LARGE")
    assert "900000000 pixels" in err.value.message and "VISION_MAX_IMAGE_PIXELS" in err.value.message


async def test_a_limit_above_pils_takes_effect(tiny_models_file: Path) -> None:
    """VISION_MAX_IMAGE_PIXELS of 250 MP: a 200 MP image (over PIL's own 179 MP refusal) is read
    (here it fails as truncated: only its header exists), and 300 MP is refused naming its size."""
    async with serve(tiny_models_file, max_image_pixels=250_000_000) as client:
        read = await client.post("/v1/classify", files={"file": ("b.png", png_header_only(20000, 10000))})
        assert read.status_code == 400 and read.json()["code"] == "INVALID_IMAGE", read.text
        refused = await client.post("/v1/classify", files={"file": ("b.png", png_header_only(20000, 15000))})
        assert refused.status_code == 413 and refused.json()["code"] == "IMAGE_TOO_LARGE"
        assert (
            "20000x15000" in refused.json()["error"] and "VISION_MAX_IMAGE_PIXELS" in refused.json()["error"]
        )
