"""VISION_JPEG_DECODE=device: JPEGs decoded in the batch where the model runs (nvJPEG on CUDA), run
here on the CPU, where the same code decodes with torchvision: answers equal the PIL path's, EXIF
orientation is applied, and a file that breaks the batch's decoder fails only its own request."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.errors import ApiError
from app.images import JpegUpload, probe_jpeg
from app.settings import Settings
from tests.app.harness import CLASSIFIER, DETECTOR, serve
from tests.app.helpers import encode, jpeg, png, png_header_only


@pytest.fixture(scope="module")
async def device_client(tiny_models_file: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The tiny models with JPEGs decoded in the batch; batches wait up to 150 ms for company."""
    async with serve(tiny_models_file, jpeg_decode="device", max_batch_size=4, max_delay_ms=150) as c:
        yield c


def _corrupt_jpeg() -> bytes:
    """A JPEG whose header reads fine (and that ends with EOI) but whose scan names a component
    that does not exist: only decoding finds it."""
    good = jpeg(48, 32, seed=3)
    start = good.index(b"\xff\xda")
    bad = bytearray(good)
    bad[start + 5] = 0x09
    return bytes(bad)


def test_probe_passes_plain_jpegs_and_leaves_the_rest_to_pil() -> None:
    probe = probe_jpeg(jpeg(80, 40, orientation=6), 10_000)
    assert isinstance(probe, JpegUpload) and probe.orientation == 6 and probe.size == (40, 80)
    assert probe_jpeg(jpeg(80, 40), 10_000) == JpegUpload(jpeg(80, 40), 1, (80, 40))
    assert probe_jpeg(png(), 10_000) is None
    assert probe_jpeg(jpeg()[:-200], 10_000) is None  # truncated: PIL refuses it with its message
    cmyk = encode(Image.new("CMYK", (20, 10), (0, 50, 100, 0)), "JPEG")
    assert probe_jpeg(cmyk, 10_000) is None
    with pytest.raises(ApiError, match="over the limit") as refused:
        probe_jpeg(jpeg(200, 100), 10_000)  # 20,000 pixels over a 10,000 limit: 413 before decoding
    assert refused.value.status_code == 413


def test_setting_resolves_by_device() -> None:
    assert Settings(_env_file=None, device="cpu").jpeg_on_device is False  # type: ignore[call-arg]
    on = Settings(_env_file=None, device="cpu", jpeg_decode="device")  # type: ignore[call-arg]
    assert on.jpeg_on_device is True
    with pytest.raises(ValueError):
        Settings(_env_file=None, jpeg_decode="gpu")  # type: ignore[call-arg]


@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
async def test_answers_equal_the_pil_path(
    client: httpx.AsyncClient, device_client: httpx.AsyncClient, orientation: int | None
) -> None:
    data = jpeg(160, 120, seed=1, orientation=orientation)
    for path, params in (
        ("/v1/classify", {"model": CLASSIFIER, "top_k": 3}),
        ("/v1/detect", {"model": DETECTOR, "score_threshold": 0.0, "max_detections": 20}),
    ):
        want = (await client.post(path, params=params, files={"file": ("a.jpg", data)})).json()
        got = await device_client.post(path, params=params, files={"file": ("a.jpg", data)})
        assert got.status_code == 200, got.text
        w, g = want["results"][0], got.json()["results"][0]
        assert g["image"] == w["image"]
        key = "predictions" if path == "/v1/classify" else "detections"
        assert len(g[key]) == len(w[key])
        # one grey level of resize difference moves scores of these random-weight nets a little
        assert [p["score"] for p in g[key]] == pytest.approx([p["score"] for p in w[key]], abs=0.02)
        if key == "detections":
            for a, b in zip(g[key], w[key], strict=True):
                assert a["box"] == pytest.approx(b["box"], abs=1.0)


async def test_mixed_request_keeps_the_order(device_client: httpx.AsyncClient) -> None:
    files = [
        ("file", ("0.png", png(50, 40))),
        ("file", ("1.jpg", jpeg(70, 30, orientation=6))),
        ("file", ("2.jpg", jpeg(90, 60))),
    ]
    response = await device_client.post("/v1/classify", params={"model": CLASSIFIER}, files=files)
    assert response.status_code == 200, response.text
    assert [r["image"] for r in response.json()["results"]] == [
        {"width": 50, "height": 40},
        {"width": 30, "height": 70},
        {"width": 90, "height": 60},
    ]


async def test_a_corrupt_jpeg_fails_only_its_request(device_client: httpx.AsyncClient) -> None:
    params = {"model": CLASSIFIER}
    files = [("file", ("ok.jpg", jpeg())), ("file", ("bad.jpg", _corrupt_jpeg()))]
    bad = device_client.post("/v1/classify", params=params, files=files)
    good = device_client.post("/v1/classify", params=params, files={"file": ("good.jpg", jpeg(seed=2))})
    bad_answer, good_answer = await asyncio.gather(bad, good)  # one batch: the delay is 150 ms
    assert good_answer.status_code == 200, good_answer.text
    assert bad_answer.status_code == 400, bad_answer.text
    body = bad_answer.json()
    assert body["code"] == "INVALID_IMAGE" and body["error"].startswith("image 1: ")
    truncated = await device_client.post("/v1/classify", files={"file": ("t.jpg", jpeg()[:-300])})
    assert truncated.status_code == 400 and truncated.json()["code"] == "INVALID_IMAGE"
    bomb = await device_client.post("/v1/classify", files={"file": ("b.png", png_header_only(9000, 9000))})
    assert bomb.status_code == 413


async def test_rendered_images_still_work(device_client: httpx.AsyncClient) -> None:
    files = {"file": ("a.jpg", jpeg(120, 80, orientation=6))}
    response = await device_client.post("/v1/detect/render", params={"model": DETECTOR}, files=files)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (80, 120)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height: refused by the header probe."""
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


async def test_the_first_failing_image_is_reported_whichever_path_found_it(
    device_client: httpx.AsyncClient,
) -> None:
    """Header probes run on the event loop, full decodes in the pool: the error is still the first
    image's by index, not the first found."""
    huge = _jpeg_claiming(9000, 9000)  # 81 M pixels: 413 from the probe, before any decoding
    broken_png = png()[:40]  # not a JPEG: decoded in the pool, where PIL refuses it
    cases = [
        ([broken_png, huge], 400, "image 0: "),
        ([huge, broken_png], 413, "image 0: "),
        ([jpeg(), broken_png, huge], 400, "image 1: "),
        ([png(), huge, broken_png], 413, "image 1: "),
    ]
    for uploads, status, prefix in cases:
        files = [("file", (f"{i}", data)) for i, data in enumerate(uploads)]
        answer = await device_client.post("/v1/classify", params={"model": CLASSIFIER}, files=files)
        assert answer.status_code == status, (prefix, answer.text)
        assert answer.json()["error"].startswith(prefix), answer.text
    alone = await device_client.post("/v1/classify", files={"file": ("h.jpg", huge)})
    assert alone.status_code == 413 and "9000" in alone.json()["error"]
