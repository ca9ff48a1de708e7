"""POST /v1/detect/render and /v1/classify/render over ASGI, the drawing itself, and the page's
routes: media types by Accept, the displayed size, drawing where the JSON boxes are, colours per
class, the same errors as the JSON endpoints."""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from app.render import (
    SMALL_IMAGE_PX,
    SMALL_MIN_FONT_PX,
    DrawnBox,
    class_colour,
    draw_detections,
    font_size,
    label_layout,
    line_width,
    negotiate,
)
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

    decoded_image: np.ndarray = np.asarray(decode_image(data, 10**8))
    return decoded_image


async def detections(client: httpx.AsyncClient, data: bytes, **params: Any) -> dict[str, Any]:
    response = await post(client, "/v1/detect", data, **params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def edge_pixel(image: np.ndarray, box: dict[str, float]) -> np.ndarray:
    """A pixel on the left edge of ``box``, halfway down (inside the drawn outline)."""
    pixel: np.ndarray = image[int((box["y1"] + box["y2"]) / 2), int(box["x1"])]
    return pixel


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
    params: dict[str, Any] = {"score_threshold": 0.5, "max_detections": 5}
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


# -- labels on small images -----------------------------------------------------------------------
#
# "A label hides an object" is measured on the label rectangles that label_layout returns (the
# ones draw_detections fills) and on the inside of each box (within its outline, where the object
# shows): a label may lie on at most a tenth of any box's inside, its own or another's, so at
# least 90% of every detected object stays in view. Labels also do not overlap each other, stay
# inside the image, use a font of at least 8 px and say the class name (the score may go). The
# drawn image's pixels are checked against the same promise: 90% of each object's pixels come
# out unchanged, and each label is drawn where the layout puts it.

SMALL = (92, 78)
#: A 92x78 thumbnail with four detections, best first: a tall person and a wide bicycle reaching
#: the top edge (no room for a label above them), a dog under the bicycle and a small cat at the
#: right, whose labels above them would land on the bicycle.
SCENE = (
    DrawnBox((4.0, 2.0, 34.0, 60.0), 15, "person", 0.93),
    DrawnBox((38.0, 6.0, 88.0, 40.0), 2, "bicycle", 0.81),
    DrawnBox((40.0, 44.0, 70.0, 76.0), 12, "dog", 0.77),
    DrawnBox((72.0, 48.0, 90.0, 72.0), 8, "cat", 0.55),
)
HIDDEN_AT_MOST = 0.1
OBJECT = (200, 200, 60)  # the objects' colour: no class colour of the scene


Rect = tuple[int, int, int, int]


def box_pixels(box: DrawnBox) -> Rect:
    """The pixels a box spans, (x1, y1, x2, y2) with x2 and y2 exclusive."""
    x1, y1, x2, y2 = box.box
    return math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)


def inside(box: DrawnBox, size: tuple[int, int]) -> Rect:
    """The pixels of a box within its drawn outline (all of it when the outline fills it)."""
    line = line_width(*size)
    x1, y1, x2, y2 = box_pixels(box)
    if x2 - x1 <= 2 * line or y2 - y1 <= 2 * line:
        return x1, y1, x2, y2
    return x1 + line, y1 + line, x2 - line, y2 - line


def overlap(a: Rect, b: Rect) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def area(rect: Rect) -> int:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])


def assert_readable_and_hiding_nothing(size: tuple[int, int], scene: Sequence[DrawnBox]) -> None:
    width, height = size
    placements = label_layout(size, scene)
    assert len(placements) == len(scene)
    insides = [inside(d, size) for d in scene]
    for detection, label in zip(scene, placements, strict=True):
        x1, y1, x2, y2 = label.rect
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, label
        assert label.font_px >= 8 and label.text in (
            f"{detection.label} {detection.score:.2f}",
            detection.label,
        )
    for box, detection in zip(insides, scene, strict=True):  # labels do not overlap: their covers add up
        covered = sum(overlap(label.rect, box) for label in placements) / area(box)
        assert covered <= HIDDEN_AT_MOST, f"labels hide {covered:.0%} of the {detection.label}"
    for first, second in itertools.combinations(placements, 2):
        assert overlap(first.rect, second.rect) == 0, (first, second)


def test_small_image_labels_never_hide_the_objects() -> None:
    assert min(SMALL) < SMALL_IMAGE_PX
    assert_readable_and_hiding_nothing(SMALL, SCENE)
    # the scene needs the small-image layout: the usual label of the person, inside its top edge
    # for lack of room above, would be as tall as the font over the person's full width
    person = box_pixels(SCENE[0])
    assert person[1] < font_size(*SMALL) and font_size(*SMALL) / (person[3] - person[1]) > HIDDEN_AT_MOST


def test_small_image_pixels_keep_every_object_in_view() -> None:
    width, height = SMALL
    image = np.full((height, width, 3), 96, dtype=np.uint8)
    objects = [inside(detection, SMALL) for detection in SCENE]  # each object fills its box
    for x1, y1, x2, y2 in objects:
        image[y1:y2, x1:x2] = OBJECT
    drawn = np.asarray(draw_detections(Image.fromarray(image), list(SCENE)))
    for detection, (x1, y1, x2, y2) in zip(SCENE, objects, strict=True):
        seen = (drawn[y1:y2, x1:x2] == OBJECT).all(axis=-1).mean()
        assert seen >= 1 - HIDDEN_AT_MOST, f"only {seen:.0%} of the {detection.label} is in view"
    for detection, label in zip(SCENE, label_layout(SMALL, SCENE), strict=True):
        x1, y1, x2, y2 = label.rect
        patch = drawn[y1:y2, x1:x2]
        on_fill = (patch == class_colour(detection.class_id)).all(axis=-1)
        # filled with the class colour, with text on it (anti-aliased: any other colour is ink)
        assert on_fill.mean() > 0.5 and (~on_fill).sum() >= 10, f"the {detection.label} label is drawn"


def test_small_image_label_shrinks_on_a_box_as_large_as_the_image() -> None:
    scene = [DrawnBox((0.0, 0.0, 92.0, 78.0), 15, "potted plant", 0.93)]
    (label,) = label_layout(SMALL, scene)
    # at the usual size the label, ~90 px wide, would cover about 16% of the box's inside
    assert SMALL_MIN_FONT_PX <= label.font_px < font_size(*SMALL)
    assert_readable_and_hiding_nothing(SMALL, scene)


def test_small_image_name_wider_than_the_image_is_cut_short() -> None:
    scene = [DrawnBox((61.0, 0.0, 64.0, 24.0), 7, "a-very-long-label-name", 0.9)]
    (label,) = label_layout((64, 48), scene)
    assert label.text.endswith("\N{HORIZONTAL ELLIPSIS}") and "a-very-long-label-name".startswith(
        label.text[:-1]
    )
    assert len(label.text) > 4 and label.rect[2] <= 64
    assert overlap(label.rect, box_pixels(scene[0])) == 0


def test_small_image_with_hundreds_of_detections_labels_each_inside_it() -> None:
    rng = np.random.default_rng(4)
    corners = rng.uniform(0, 80, (600, 2))
    scene = [
        DrawnBox((x, y, x + w, y + h), int(c), "dog", 0.5)
        for (x, y), (w, h), c in zip(
            corners, rng.uniform(1, 20, (600, 2)), rng.integers(0, 91, 600), strict=True
        )
    ]
    placements = label_layout(SMALL, scene)
    assert len(placements) == 600
    assert all(0 <= p.rect[0] < p.rect[2] <= 92 and 0 <= p.rect[1] < p.rect[3] <= 78 for p in placements)


def test_large_image_labels_keep_their_usual_place() -> None:
    size = (640, 480)
    font = font_size(*size)
    scene = [
        DrawnBox((100.0, 200.0, 300.0, 400.0), 1, "roomy", 0.9),  # room above: the label sits on the box
        DrawnBox((50.0, 3.0, 200.0, 150.0), 2, "at-the-top", 0.8),  # no room above: inside the top edge
        DrawnBox((630.0, 300.0, 640.0, 360.0), 3, "at-the-right", 0.7),  # moved left into the image
        DrawnBox((120.0, 180.0, 310.0, 420.0), 4, "under-the-first", 0.6),  # overlapping: not moved
    ]
    roomy, top, right, under = label_layout(size, scene)
    assert all(p.font_px == font for p in (roomy, top, right, under))
    assert roomy.text == "roomy 0.90" and (roomy.rect[0], roomy.rect[3]) == (100, 200)
    assert (top.rect[0], top.rect[1]) == (50, 3)
    assert right.rect[2] == 640 and right.rect[3] == 300
    assert (under.rect[0], under.rect[3]) == (120, 180)


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
    app = create_app(settings_for(ui_enabled=False))  # no lifespan: these routes need no models
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as off:
        for path in ("/", "/ui/app.js"):
            response = await off.get(path)
            assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
