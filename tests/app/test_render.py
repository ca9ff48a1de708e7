"""POST /v1/detect/render and /v1/classify/render over ASGI, the drawing itself, and the page's
routes: media types by Accept, the displayed size, drawing where the JSON boxes are, colours per
class, the same errors as the JSON endpoints."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from app.render import DrawnBox, class_colour, draw_detections, font_size, negotiate
from tests.app.harness import CLASSIFIER, DETECTOR, VOC_DETECTOR, settings_for
from tests.app.helpers import jpeg, png, png_header_only

RENDER = "/v1/detect/render"


async def post(
    client: httpx.AsyncClient, path: str, data: bytes, accept: str | None = None, **params: Any
) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return await client.post(path, params=params, files={"file": ("x", data)}, headers=headers)


def pixels(response: httpx.Response) -> np.ndarray:
    """The returned image as (H, W, 3) uint8."""
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGB"
    return np.asarray(image)


def decoded(data: bytes) -> np.ndarray:
    from app.images import decode_image

    return np.asarray(decode_image(data, 10**8))


async def detections(client: httpx.AsyncClient, data: bytes, **params: Any) -> dict[str, Any]:
    response = await post(client, "/v1/detect", data, **params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def edge_pixel(image: np.ndarray, box: dict[str, float]) -> np.ndarray:
    """A pixel on the left edge of ``box``, halfway down (inside the drawn outline)."""
    return image[int((box["y1"] + box["y2"]) / 2), int(box["x1"])]


# -- media types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "image/png"),
        ("", "image/png"),
        ("*/*", "image/png"),
        ("image/*", "image/png"),
        ("image/jpeg", "image/jpeg"),
        ("image/png", "image/png"),
        ("image/jpeg, image/png", "image/png"),  # a tie: the server's preference
        ("image/png;q=0.5, image/jpeg", "image/jpeg"),
        ("image/jpeg;q=0.9, */*;q=0.1", "image/jpeg"),
        ("text/html, image/webp, */*;q=0.8", "image/png"),  # a browser's <img> Accept
        ("image/png;q=0, */*", "image/jpeg"),  # the specific range wins over */*
        ("IMAGE/JPEG; Q=0.7", "image/jpeg"),
        ("image/jpeg;q=nonsense, image/png;q=0.2", "image/png"),
        ("application/json", None),
        ("image/webp", None),
        ("image/*;q=0", None),
        ("image/png;q=0, image/jpeg;q=0", None),
        ("*/*;q=0", None),
    ],
)
def test_accept_negotiation(accept: str | None, expected: str | None) -> None:
    assert negotiate(accept) == expected


async def test_png_by_default_and_jpeg_when_accept_prefers_it(client: httpx.AsyncClient) -> None:
    data = jpeg(160, 120)
    as_png = await post(client, RENDER, data)
    assert as_png.status_code == 200, as_png.text
    assert as_png.headers["content-type"] == "image/png"
    assert as_png.content.startswith(b"\x89PNG\r\n\x1a\n")
    any_type = await post(client, RENDER, data, accept="*/*")
    assert any_type.headers["content-type"] == "image/png"
    as_jpeg = await post(client, RENDER, data, accept="image/jpeg, image/png;q=0.5")
    assert as_jpeg.status_code == 200 and as_jpeg.headers["content-type"] == "image/jpeg"
    assert as_jpeg.content.startswith(b"\xff\xd8")
    assert Image.open(io.BytesIO(as_jpeg.content)).size == (160, 120)
    assert as_png.headers["vary"] == "Accept"


async def test_an_accept_without_png_or_jpeg_is_406_json(client: httpx.AsyncClient) -> None:
    response = await post(client, RENDER, jpeg(), accept="application/json")
    assert response.status_code == 406
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == "NOT_ACCEPTABLE" and body["request_id"] == response.headers["x-request-id"]
    assert "image/png" in body["error"]


# -- what is drawn --------------------------------------------------------------------------------


async def test_exif_rotated_input_comes_back_upright(client: httpx.AsyncClient) -> None:
    data = jpeg(64, 48, orientation=6)  # stored 64x48, displayed 48x64
    response = await post(client, RENDER, data)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (48, 64)
    assert (await detections(client, data))["image"] == {"width": 48, "height": 64}
    classified = await post(client, "/v1/classify/render", data)
    assert Image.open(io.BytesIO(classified.content)).size == (48, 64)


async def test_boxes_are_drawn_where_the_json_puts_them(client: httpx.AsyncClient) -> None:
    data = png(320, 240, seed=3)
    params = {"score_threshold": 0.5, "max_detections": 5}
    result = await detections(client, data, **params)
    assert result["detections"], "the confident tiny detector finds something"
    response = await post(client, RENDER, data, **params)
    assert response.status_code == 200, response.text
    assert response.headers["x-detections"] == str(len(result["detections"]))
    drawn, original = pixels(response), decoded(data)
    assert drawn.shape == original.shape == (240, 320, 3)
    top = result["detections"][0]  # drawn last: its outline is on top everywhere
    on_edge = edge_pixel(drawn, top["box"])
    assert not np.array_equal(on_edge, edge_pixel(original, top["box"]))
    assert int(on_edge.max()) - int(on_edge.min()) > 100, "a saturated class colour, not a photo grey"


async def test_nothing_detected_returns_the_image_untouched(client: httpx.AsyncClient) -> None:
    data = png(96, 80, seed=5)
    assert (await detections(client, data, score_threshold=1.0))["detections"] == []
    response = await post(client, RENDER, data, score_threshold=1.0)
    assert response.status_code == 200 and response.headers["x-detections"] == "0"
    assert np.array_equal(pixels(response), decoded(data))  # PNG: lossless


async def test_colours_are_stable_per_class(client: httpx.AsyncClient) -> None:
    colours: dict[int, set[tuple[int, ...]]] = {}
    images: dict[int, set[int]] = {}
    for seed, (width, height) in ((3, (320, 240)), (8, (300, 200)), (11, (256, 256))):
        data = png(width, height, seed=seed)
        (top,) = (await detections(client, data, max_detections=1))["detections"]
        response = await post(client, RENDER, data, max_detections=1)
        colours.setdefault(top["class_id"], set()).add(
            tuple(int(v) for v in edge_pixel(pixels(response), top["box"]))
        )
        images.setdefault(top["class_id"], set()).add(seed)
    assert any(len(seeds) >= 2 for seeds in images.values()), "a class seen in two different images"
    assert all(len(found) == 1 for found in colours.values()), colours
    first, second = (
        await post(client, RENDER, png(320, 240, seed=3)),
        await post(client, RENDER, png(320, 240, seed=3)),
    )
    assert first.content == second.content  # same request, same bytes
    # different classes, different colours (the palette, not the photo, picks them)
    assert len({class_colour(class_id) for class_id in range(91)}) == 91


async def test_classify_render_overlays_the_top_k(client: httpx.AsyncClient) -> None:
    data = png(200, 150, seed=1)
    response = await post(client, "/v1/classify/render", data, top_k=3)
    assert response.status_code == 200, response.text
    assert response.headers["x-predictions"] == "3" and response.headers["x-model"] == CLASSIFIER
    drawn, original = pixels(response), decoded(data)
    assert drawn.shape == original.shape
    assert (drawn[:20, :40] != original[:20, :40]).any()  # the panel at the top-left
    assert np.array_equal(drawn[-20:, -40:], original[-20:, -40:])  # the rest untouched


def test_labels_scale_with_the_image_and_stay_inside() -> None:
    assert font_size(64, 48) >= 10
    assert font_size(4000, 3000) >= 60  # ~2% of the long side: readable when the photo is shrunk
    for width, height in ((64, 48), (4000, 3000)):
        size = font_size(width, height)
        image = Image.new("RGB", (width, height), (128, 128, 128))
        # a thin box at the top-right corner: no room above it or to its right for the label
        x1 = width - 3
        box = DrawnBox((float(x1), 0.0, float(width), height * 0.5), 7, "a-long-label-name", 0.9)
        drawn = np.asarray(draw_detections(image, [box]))
        left_of_box = (drawn[:, : x1 - 1] != 128).any(axis=-1)  # only the label can be here
        rows, cols = np.flatnonzero(left_of_box.any(axis=1)), np.flatnonzero(left_of_box.any(axis=0))
        assert rows.size and rows.min() == 0, "the label sits inside the image, at its top"
        assert rows.max() + 1 >= 0.8 * size, "the label box is as tall as the font"
        assert cols.min() < x1 - 2 * size, "the label was moved left, into the image"


# -- same inputs, limits and errors as /v1/detect -----------------------------------------------


async def test_every_request_form_one_image(client: httpx.AsyncClient) -> None:
    import base64

    data = jpeg(80, 60)
    raw = await client.post(RENDER, content=data, headers={"Content-Type": "image/jpeg"})
    as_json = await client.post(RENDER, json={"image": base64.b64encode(data).decode()})
    multipart = await post(client, RENDER, data)
    assert raw.status_code == as_json.status_code == multipart.status_code == 200
    assert raw.content == as_json.content == multipart.content


@pytest.mark.parametrize(
    ("path", "params", "body", "status", "code"),
    [
        ("/v1/detect", {}, b"not an image", 400, "INVALID_IMAGE"),
        ("/v1/detect", {}, png_header_only(9_000, 9_000), 413, "IMAGE_TOO_LARGE"),
        ("/v1/detect", {"model": CLASSIFIER}, None, 409, "WRONG_TASK"),
        ("/v1/detect", {"model": "nope"}, None, 404, "MODEL_NOT_FOUND"),
        ("/v1/detect", {"score_threshold": 2}, None, 422, "VALIDATION_ERROR"),
        ("/v1/detect", {"top_k": 3}, None, 422, "VALIDATION_ERROR"),
        ("/v1/classify", {"model": DETECTOR}, None, 409, "WRONG_TASK"),
        ("/v1/classify", {}, b"", 400, "INVALID_IMAGE"),
    ],
    ids=[
        "bad-image",
        "too-many-pixels",
        "classifier",
        "unknown",
        "bad-param",
        "other-task-param",
        "detector",
        "empty",
    ],
)
async def test_same_errors_as_the_json_endpoint(
    client: httpx.AsyncClient, path: str, params: dict[str, Any], body: bytes | None, status: int, code: str
) -> None:
    data = jpeg() if body is None else body
    json_answer = await post(client, path, data, **params)
    rendered = await post(client, f"{path}/render", data, **params)
    assert (json_answer.status_code, json_answer.json()["code"]) == (status, code)
    assert (rendered.status_code, rendered.json()["code"]) == (status, code)
    assert rendered.headers["content-type"] == "application/json"
    assert rendered.json()["error"] == json_answer.json()["error"]


async def test_more_than_one_image_is_413_too_many_files(client: httpx.AsyncClient) -> None:
    two = [("file", ("a", jpeg())), ("file", ("b", jpeg(seed=1)))]
    response = await client.post(RENDER, files=two)
    assert response.status_code == 413 and response.json()["code"] == "TOO_MANY_FILES"
    assert "one image" in response.json()["error"]
    batch = await client.post("/v1/detect", files=two)
    assert batch.status_code == 200  # the JSON endpoint takes both
    as_json = await client.post(RENDER, json={"images": ["aGk=", "aGk="]})
    assert as_json.status_code == 413 and as_json.json()["code"] == "TOO_MANY_FILES"


async def test_parameters_and_model_choice_like_detect(client: httpx.AsyncClient) -> None:
    data = png(160, 120, seed=2)
    voc = await detections(client, data, model=VOC_DETECTOR)  # its own default threshold: 0.6
    response = await post(client, RENDER, data, model=VOC_DETECTOR, box_format="cxcywh")
    assert response.status_code == 200 and response.headers["x-model"] == VOC_DETECTOR
    assert response.headers["x-detections"] == str(len(voc["detections"]))
    assert all(d["score"] >= 0.6 for d in voc["detections"])
    capped = await post(client, RENDER, data, score_threshold=0, max_detections=3)
    assert capped.headers["x-detections"] == "3"


async def test_request_id_metrics_and_server_timing(client: httpx.AsyncClient) -> None:
    response = await client.post(RENDER, files={"file": ("x", jpeg())}, headers={"X-Request-ID": "render-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "render-1"
    assert response.headers["server-timing"].startswith("app;dur=")
    metrics = (await client.get("/metrics")).text
    assert f'vision_requests_total{{endpoint="{RENDER}",model="{DETECTOR}",status="200"}}' in metrics
    assert (await post(client, RENDER, jpeg(), accept="text/plain")).status_code == 406
    metrics = (await client.get("/metrics")).text
    assert 'vision_rejects_total{reason="NOT_ACCEPTABLE"}' in metrics


# -- the page -------------------------------------------------------------------------------------


async def test_the_page_and_its_files(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert '<script src="ui/app.js"' in page.text and "<script>" not in page.text  # no inline script
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    script = await client.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "https://" not in script.text and "http://" not in script.text
    assert (await client.get("/ui/app.css")).status_code == 200
    assert (await client.get("/ui/nope.js")).status_code == 404


async def test_the_page_can_be_switched_off() -> None:
    app = create_app(settings_for(ui_enabled=False), [])  # no lifespan: these routes need no models
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as off:
        for path in ("/", "/ui/app.js"):
            response = await off.get(path)
            assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
