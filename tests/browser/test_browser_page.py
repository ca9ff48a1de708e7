"""The page at ``/`` in a real browser: headless Chromium (Debian's ``chromium`` package) driven by
Playwright, against a real ``python -m app`` on 127.0.0.1 serving the tiny test models.

A real photo goes in through the file input; the table and the overlay must match the JSON API's
answer for the same image and threshold; the slider must re-filter without a request; an API error
must read as a message. A screenshot is saved (its path is printed; ``UI_SCREENSHOT=<file>`` also
copies it there).

Chromium cannot be downloaded by Playwright here: the test uses the system browser and FAILS (it
does not skip) when it is missing, because CI installs it (``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.harness import CLASSIFIER, DETECTOR, tiny_models_toml
from tests.app.test_server_process import Server, photo_bytes, server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: What the page asks for (app/static/app.js): every detection down to this floor, then filters.
PAGE_MAX_DETECTIONS = 1000

__all__ = ["server"]  # the real-server fixture of tests/app/test_server_process.py, reused


@pytest.fixture(scope="module")
def tiny_models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models file the ``server`` fixture serves (its tiny detector gives confident boxes)."""
    return tiny_models_toml(tmp_path_factory.mktemp("browser-models"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install playwright (the 'test' extra has it)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's browser (apt-get update && apt-get install -y "
            "chromium chromium-driver) or point CHROMIUM_PATH at one"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def api_detections(
    base_url: str, image: bytes, threshold: float, model: str = DETECTOR
) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{base_url}/v1/detect",
        params={"model": model, "score_threshold": threshold, "max_detections": PAGE_MAX_DETECTIONS},
        files={"file": ("china.jpg", image, "image/jpeg")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["results"][0]["detections"]
    return found


def table_rows(page: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = page.eval_on_selector_all(
        "#detections tbody tr",
        """rows => rows.map(r => ({
            label: r.cells[1].textContent, score: Number(r.dataset.score),
            classId: Number(r.dataset.classId), shownScore: r.cells[2].textContent,
            box: r.cells[3].textContent}))""",
    )
    return rows


def assert_page_matches(page: Any, expected: list[dict[str, Any]]) -> None:
    rows = table_rows(page)
    assert len(rows) == len(expected)
    for row, detection in zip(rows, expected, strict=True):
        assert row["label"] == detection["label"] and row["classId"] == detection["class_id"]
        assert row["score"] == pytest.approx(detection["score"], abs=1e-6)
        assert row["shownScore"] == f"{detection['score']:.3f}"
        shown = [float(v) for v in row["box"].split(",")]
        box = detection["box"]
        assert shown == pytest.approx([box["x1"], box["y1"], box["x2"], box["y2"]], abs=0.06)
    assert page.get_attribute("#overlay", "data-boxes") == str(len(expected))


def pick_threshold(scores: list[float], above: float) -> float:
    """A slider value (a multiple of its step, 0.001) over ``above`` that keeps fewer detections, and
    no score within 1e-5 of it (so float32 vs float64 rounding cannot decide a row)."""
    count = sum(s >= above for s in scores)
    for thousandths in range(round(above * 1000) + 1, 1001):
        value = thousandths / 1000
        if sum(s >= value for s in scores) < count and all(abs(s - value) > 1e-5 for s in scores):
            return value
    raise AssertionError(f"no threshold over {above} drops a detection: {scores}")


def test_the_page_in_a_real_browser(
    browser: Any, server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    china = photo_bytes("china.jpg")
    (tmp_path / "china.jpg").write_bytes(china)
    (tmp_path / "notes.txt").write_text("this is not an image\n")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}")
            if message.type == "error" and "Failed to load resource" not in message.text
            else None
        ),
    )
    try:
        page.goto(f"{server.base_url}/")
        page.wait_for_selector("body[data-state='idle']")
        assert page.input_value("#model") == DETECTOR
        assert all(url.split(" ", 1)[1].startswith(server.base_url) for url in requests), requests
        threshold = float(page.input_value("#threshold"))
        assert threshold == 0.5  # the contract's default: the tiny COCO detector sets none

        # a real photo through the file input -> one POST, the table and boxes of the JSON answer
        page.set_input_files("#file", str(tmp_path / "china.jpg"))
        page.wait_for_selector("body[data-state='done']")
        posts = [r for r in requests if r.startswith("POST ")]
        assert len(posts) == 1 and "/v1/detect?" in posts[0], posts
        expected = api_detections(server.base_url, china, threshold)
        assert expected, "the confident tiny detector finds something in china.jpg"
        assert_page_matches(page, expected)
        summary = page.text_content("#summary") or ""
        assert f"{len(expected)} of " in summary and "server " in summary and " ms" in summary
        # the overlay is painted where the first JSON box's left edge is
        box = expected[0]["box"]
        alpha = page.evaluate(
            """([x, y]) => {
                const c = document.getElementById('overlay');
                return c.getContext('2d').getImageData(x, y, 1, 1).data[3];
            }""",
            [int(box["x1"]) + 1, int((box["y1"] + box["y2"]) / 2)],
        )
        assert alpha > 0
        assert page.evaluate("document.getElementById('overlay').width") == 640  # the image's own pixels
        image_rect, overlay_rect = (page.locator(s).bounding_box() for s in ("#preview", "#overlay"))
        assert image_rect and overlay_rect and image_rect["width"] > 100
        for key in ("x", "y", "width", "height"):  # the overlay lies exactly over the image
            assert overlay_rect[key] == pytest.approx(image_rect[key], abs=1.0), (image_rect, overlay_rect)
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("UI_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["UI_SCREENSHOT"])
        with capsys.disabled():
            print(f"\nscreenshot of the page: {shot}")

        # the slider filters in the browser: fewer rows, the API's answer at that threshold, no request
        every = api_detections(server.base_url, china, 0.0)
        higher = pick_threshold([d["score"] for d in every], threshold)
        before = len(requests)
        page.fill("#threshold", f"{higher:.3f}")
        assert page.text_content("#threshold-value") == f"{higher:.3f}"
        stricter = api_detections(server.base_url, china, higher)
        assert len(stricter) < len(expected)
        assert_page_matches(page, stricter)
        assert len(requests) == before, requests[before:]

        # a classifier: top-k bars matching /v1/classify
        page.select_option("#model", CLASSIFIER)
        page.wait_for_selector("#predictions li")  # (the page's CSP forbids wait_for_function's eval)
        classify = httpx.post(
            f"{server.base_url}/v1/classify",
            params={"top_k": 5},
            files={"file": ("c.jpg", china)},
            timeout=60,
        ).json()["results"][0]["predictions"]
        bars = page.eval_on_selector_all(
            "#predictions li", "items => items.map(i => Number(i.dataset.classId))"
        )
        assert bars == [p["class_id"] for p in classify]
        assert page.is_hidden("#detections") and page.is_hidden("#threshold-control")

        # an API error reads as a message
        page.select_option("#model", DETECTOR)
        page.wait_for_selector("#detections", state="visible")
        page.set_input_files("#file", str(tmp_path / "notes.txt"))
        page.wait_for_selector("body[data-state='error']")
        error = page.text_content("#error") or ""
        assert page.is_visible("#error")
        assert error.startswith("INVALID_IMAGE: not a decodable image"), error
        assert "HTTP 400" in error and "{" not in error
        assert page.get_attribute("#overlay", "data-boxes") == "0"
        assert table_rows(page) == []

        # dropping the photo on the drop zone works like picking it (the threshold is back at the
        # model's default since the model was chosen again)
        transfer = page.evaluate_handle(
            """b64 => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], 'china.jpg', {type: 'image/jpeg'}));
                return transfer;
            }""",
            base64.b64encode(china).decode(),
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("body[data-state='done']")
        assert page.is_hidden("#error")
        assert_page_matches(page, expected)

        assert problems == [], problems  # no script errors, no CSP refusals
    finally:
        page.close()
