"""The browser page for trying the models: ``GET /`` and its files under ``/ui/``.

Plain HTML, CSS and JavaScript shipped in the package (``app/static/``): no CDN, no build step,
works offline. The page only calls the public API (``/v1/models``, ``/v1/detect``,
``/v1/classify``), so it shows nothing a client could not get. Its URLs are relative
(``ui/app.js``, ``v1/models``): behind a proxy that serves the service under a path prefix, it
loads from there. ``VISION_UI_ENABLED=false`` removes both routes (404). The page is sent with a
Content-Security-Policy that allows only this origin: no inline script or style, no external
resource.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.settings import Settings

#: The page's files, installed with the package (pyproject package-data).
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: Where the page's scripts and styles are served.
UI_PREFIX = "/ui"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def add_ui(app: FastAPI, settings: Settings) -> None:
    """Serve the page at ``/`` and its files under ``/ui/`` when ``settings.ui_enabled``."""
    if not settings.ui_enabled:
        return
    app.include_router(router)
    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR), name="ui")
