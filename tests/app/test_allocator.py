"""The service's start tunes glibc malloc (app/allocator.py) without overriding the user's choices."""

from __future__ import annotations

import platform

import pytest

from app.allocator import TUNING, tuned_environ
from tests.app.harness import settings_for

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only")


@glibc
def test_missing_variables_are_added() -> None:
    env = tuned_environ({"PATH": "/bin"})
    assert env is not None
    assert env["PATH"] == "/bin" and env["MALLOC_MMAP_MAX_"] == "0"
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 2**30


@glibc
def test_user_values_are_kept_and_no_reexec_when_all_are_set() -> None:
    env = tuned_environ({"MALLOC_MMAP_MAX_": "65536"})
    assert env is not None and env["MALLOC_MMAP_MAX_"] == "65536"
    assert env["MALLOC_TRIM_THRESHOLD_"] == TUNING["MALLOC_TRIM_THRESHOLD_"]
    assert tuned_environ(dict(TUNING)) is None  # nothing to change: no re-exec loop


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_the_setting_turns_it_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_ALLOCATOR_TUNING", value)
    assert settings_for().allocator_tuning is False
