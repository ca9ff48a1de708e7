"""app.settings.Settings: VISION_ env vars, .env, validation at start, device/precision resolution."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import app.settings as settings_module
from app.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No VISION_* from the outside, and a working directory without a .env."""
    for name in [n for n in os.environ if n.startswith("VISION_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_contract() -> None:
    s = Settings()
    assert s.models_file == Path("weights/models.toml")
    assert (s.device, s.precision) == ("auto", "fp32")
    assert s.max_body_bytes == 20 * 1024 * 1024
    assert (s.max_image_pixels, s.max_files) == (40_000_000, 32)
    assert (s.max_batch_size, s.max_delay_ms, s.max_queue_images) == (8, 5.0, 64)
    assert s.request_timeout_ms == 30_000
    assert s.docs_enabled is True
    assert 1 <= s.decode_threads <= 2
    assert s.resolved_torch_threads >= 1


def test_no_settings_object_is_built_at_import() -> None:
    assert not any(isinstance(value, Settings) for value in vars(settings_module).values())


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_MAX_FILES", "3")
    monkeypatch.setenv("VISION_DEVICE", "CPU")
    monkeypatch.setenv("VISION_DOCS_ENABLED", "false")
    monkeypatch.setenv("MAX_FILES", "99")  # without the prefix: ignored
    s = Settings()
    assert (s.max_files, s.device, s.docs_enabled) == (3, "cpu", False)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("VISION_MAX_BATCH_SIZE=2\nVISION_LOG_LEVEL=debug\n")
    s = Settings()
    assert (s.max_batch_size, s.log_level) == (2, "DEBUG")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("device", "gpu", "auto, cpu, cuda or cuda:N"),
        ("device", "cuda:x", "auto, cpu, cuda or cuda:N"),
        ("precision", "fp64", "fp32"),
        ("max_body_bytes", "0", "greater than 0"),
        ("max_files", "-1", "greater than 0"),
        ("max_batch_size", "0", "greater than or equal to 1"),
        ("max_delay_ms", "-5", "greater than or equal to 0"),
        ("request_timeout_ms", "abc", "integer"),
        ("log_level", "LOUD", "DEBUG"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, field: str, value: str, words: str) -> None:
    monkeypatch.setenv(f"VISION_{field.upper()}", value)
    with pytest.raises(ValidationError) as err:
        Settings()
    assert field in str(err.value) and words in str(err.value)


def test_queue_must_hold_a_full_request() -> None:
    with pytest.raises(ValidationError, match="max_queue_images"):
        Settings(max_files=32, max_queue_images=8)


@pytest.mark.cuda
def test_auto_device_and_cuda_checks() -> None:
    assert Settings(device="cpu").torch_device == "cpu"
    assert Settings(device="auto").torch_device == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match="CUDA"):
        _ = Settings(device=missing).torch_device


def test_auto_precision_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "cpu_flags", lambda: {"sse4_2", "avx512_bf16"})
    assert Settings(device="cpu", precision="auto").torch_precision == "bf16"
    monkeypatch.setattr(settings_module, "cpu_flags", lambda: {"sse4_2", "amx_bf16"})
    assert Settings(device="cpu", precision="auto").torch_precision == "bf16"
    monkeypatch.setattr(settings_module, "cpu_flags", lambda: {"sse4_2", "avx2"})
    assert Settings(device="cpu", precision="auto").torch_precision == "fp32"
    assert Settings(device="cpu", precision="fp16").torch_precision == "fp16"


def test_cpu_flags_reads_this_machine() -> None:
    flags = settings_module.cpu_flags()
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        assert "fpu" in flags  # every x86 CPU lists it


def test_a_misspelt_variable_stops_the_start_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_MAX_BATCH", "16")
    with pytest.raises(ValidationError) as error:
        Settings()
    assert "VISION_MAX_BATCH is not a setting; did you mean VISION_MAX_BATCH_SIZE?" in str(error.value)
    monkeypatch.delenv("VISION_MAX_BATCH")
    monkeypatch.setenv("VISION_SOMETHING_ELSE", "1")
    with pytest.raises(ValidationError, match="VISION_SOMETHING_ELSE is not a setting"):
        Settings()


def test_a_misspelt_dotenv_key_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("VISION_MAX_FILE=3\n")
    with pytest.raises(ValidationError, match="max_file"):
        Settings()


def test_compose_variables_are_not_settings_but_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in settings_module.DEPLOYMENT_VARIABLES:
        monkeypatch.setenv(name, "1")
    Settings()


def test_the_readme_lists_every_setting_once() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| `(VISION_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE)
    fields = [settings_module.PREFIX + name.upper() for name in Settings.model_fields]
    assert sorted(rows) == sorted(fields)


def test_each_worker_queues_its_share_of_the_pools_limit() -> None:
    assert Settings(max_queue_images=64, max_files=8).queue_share == 64  # one process: all of it
    worker = Settings(max_queue_images=64, max_files=8, workers=4, worker_slot=1)
    assert worker.queue_share == 16  # 4 x 16 = the pool's 64
    assert Settings(max_queue_images=64, max_files=32, workers=4, worker_slot=0).queue_share == 32
    assert Settings(max_queue_images=65, max_files=8, workers=2, worker_slot=0).queue_share == 33
