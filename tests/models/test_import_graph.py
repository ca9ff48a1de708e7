"""models/ stays below the service: importing it pulls in no HTTP, settings or app code."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import models

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("fastapi", "starlette", "uvicorn", "httpx", "pydantic_settings", "app")

_PROBE = """
import importlib, json, pkgutil, sys
import models
names = sorted(m.name for m in pkgutil.walk_packages(models.__path__, "models."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def test_importing_models_loads_no_http_settings_or_app_code() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = sorted(f"models.{m.name}" for m in pkgutil.iter_modules(models.__path__))
    assert set(expected) <= set(report["imported"]) and "models.convert" in report["imported"]
    leaked = [m for m in report["modules"] if m.split(".")[0] in FORBIDDEN]
    assert leaked == [], f"models/ imported {leaked}"


def test_sources_do_not_import_app() -> None:
    pattern = re.compile(r"^\s*(from\s+app(\.|\s)|import\s+app(\.|\s|$))", re.MULTILINE)
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "models").rglob("*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    assert pattern.search("from app.settings import Settings") and pattern.search("import app")
