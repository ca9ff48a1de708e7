"""app.logs: plain or JSON lines on stderr; uvicorn's access log off."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from app.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = access


def test_json_lines(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_lines=True)
    logging.getLogger("app.access").info("POST %s %d", "/v1/classify", 200)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("app").exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "POST /v1/classify 200" and lines[0]["level"] == "INFO"
    assert lines[0]["logger"] == "app.access"
    assert lines[1]["level"] == "ERROR" and "ValueError: bad" in lines[1]["exc_info"]
    assert logging.getLogger("uvicorn.access").disabled


def test_plain_lines_and_level(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING")
    logging.getLogger("app").info("hidden")
    logging.getLogger("app").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "WARNING app: shown" in err
