"""weights/download.py, against a local HTTP server on 127.0.0.1 (no network needed).

In-process tests swap the catalogue for small files whose digests the test computes itself; the
command-line tests run the real script with its real catalogue through ``--mirror``.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import re
import socket
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "weights" / "download.py"
MODELS_TOML = ROOT / "weights" / "public.toml"  # the public checkpoints' models file


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("weights_download", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


download = _load_script()


@dataclass
class FileServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1; records the paths asked for."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    send_length: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture()
def server() -> Iterator[FileServer]:
    state = FileServer(port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404, "not here")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if state.send_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PAYLOAD = b"not really a checkpoint, but bytes all the same\n" * 5000  # 245 kB: 4 reads of 64 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def small_catalogue(monkeypatch: pytest.MonkeyPatch) -> object:
    ckpt = download.Checkpoint(
        name="tiny",
        filename="tiny-model.pth",
        url="http://unused.invalid/tiny-model.pth",
        sha256=PAYLOAD_SHA,
        size=len(PAYLOAD),
        what="test file",
    )
    monkeypatch.setattr(download, "CHECKPOINTS", (ckpt,))
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 * 1024)  # several reads per file
    return ckpt


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- in process, small catalogue ---------------------------------------------------------------


def test_download_verifies_and_installs(server: FileServer, small_catalogue: object, tmp_path: Path) -> None:
    server.files["tiny-model.pth"] = PAYLOAD
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    target = tmp_path / "tiny-model.pth"
    assert target.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["tiny-model.pth"]  # no .part file
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by the container's user
    assert server.requests == ["/tiny-model.pth"]


def test_download_without_content_length(server: FileServer, small_catalogue: object, tmp_path: Path) -> None:
    server.files["tiny-model.pth"] = PAYLOAD
    server.send_length = False
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    assert (tmp_path / "tiny-model.pth").read_bytes() == PAYLOAD


def test_present_file_with_right_hash_is_skipped(
    server: FileServer, small_catalogue: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiny-model.pth").write_bytes(PAYLOAD)
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    assert server.requests == []
    assert "present, sha256 verified" in capsys.readouterr().out


def test_present_file_with_wrong_hash_is_replaced(
    server: FileServer, small_catalogue: object, tmp_path: Path
) -> None:
    (tmp_path / "tiny-model.pth").write_bytes(b"truncated")
    server.files["tiny-model.pth"] = PAYLOAD
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    assert (tmp_path / "tiny-model.pth").read_bytes() == PAYLOAD
    assert server.requests == ["/tiny-model.pth"]


def test_hash_mismatch_fails_and_leaves_nothing(
    server: FileServer, small_catalogue: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # same size, other bytes: only the digest can tell
    ckpt = download.CHECKPOINTS[0]
    tampered = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    server.files["tiny-model.pth"] = tampered
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 1
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err
    assert ckpt.sha256 in err and hashlib.sha256(tampered).hexdigest() in err
    assert _leftovers(tmp_path) == []


def test_wrong_hash_on_disk_is_kept_when_the_download_also_fails(
    server: FileServer, small_catalogue: object, tmp_path: Path
) -> None:
    # nothing better arrived: the user's file is left as it was, and the exit says so
    (tmp_path / "tiny-model.pth").write_bytes(b"mine")
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 1  # server: 404
    assert (tmp_path / "tiny-model.pth").read_bytes() == b"mine"
    assert _leftovers(tmp_path) == ["tiny-model.pth"]


def test_unverifiable_file_is_downloaded_and_its_digest_printed(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = download.Checkpoint(
        name="nohash",
        filename="nohash.pth",
        url="http://unused.invalid/nohash.pth",
        sha256=None,
        size=None,
        what="test file",
    )
    monkeypatch.setattr(download, "CHECKPOINTS", (ckpt,))
    server.files["nohash.pth"] = PAYLOAD
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    out = capsys.readouterr().out
    assert "not verified" in out and PAYLOAD_SHA in out
    # present now: not fetched again, digest printed again
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 0
    assert server.requests == ["/nohash.pth"]
    assert PAYLOAD_SHA in capsys.readouterr().out


def test_longer_than_announced_is_refused(
    server: FileServer, small_catalogue: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["tiny-model.pth"] = PAYLOAD + b"x" * 10
    server.send_length = False  # so only the running count can notice
    assert download.main(["--dir", str(tmp_path), "--mirror", server.url]) == 1
    assert "more than the expected" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


# -- the real script, real catalogue ---------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_cli_unreachable_host_says_what_to_do(tmp_path: Path) -> None:
    mirror = f"http://127.0.0.1:{_closed_port()}/"
    proc = _run("--dir", str(tmp_path), "--mirror", mirror, "--timeout", "5", "vgg16-imagenet")
    assert proc.returncode == 1
    err = proc.stderr
    assert "no network" in err
    assert f"{mirror}vgg16-397923af.pth" in err  # what was tried
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in err  # where to get it by hand
    assert str(tmp_path / "vgg16-397923af.pth") in err  # where to put it
    assert "expected sha256 397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0" in err
    assert _leftovers(tmp_path) == []


def test_cli_wrong_file_fails_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    server.files["ssd300_vgg16_coco-b556d3b4.pth"] = b"an impostor"
    proc = _run("--dir", str(tmp_path), "--mirror", server.url, "ssd300-coco")
    assert proc.returncode == 1
    assert "expected 142594222" in proc.stderr  # refused from Content-Length, before the body
    assert "b556d3b43ab6c3f63d81bfb8835fe8756ac22da664357da100dccf96b6a6b42d" in proc.stderr
    assert _leftovers(tmp_path) == []


def test_cli_http_error(server: FileServer, tmp_path: Path) -> None:
    proc = _run("--dir", str(tmp_path), "--mirror", server.url, "ssd300_mAP_77.43_v2.pth")
    assert proc.returncode == 1
    assert "HTTP 404" in proc.stderr and "ssd300_mAP_77.43_v2.pth" in proc.stderr
    assert _leftovers(tmp_path) == []


def test_cli_continues_after_a_failure_and_counts(server: FileServer, tmp_path: Path) -> None:
    proc = _run("--dir", str(tmp_path), "--mirror", server.url, "--timeout", "5")
    assert proc.returncode == 1
    assert proc.stderr.count("error: ") == 3
    assert "3 of 3 checkpoint(s) not installed" in proc.stderr
    assert sorted(server.requests) == sorted(
        ["/vgg16-397923af.pth", "/ssd300_vgg16_coco-b556d3b4.pth", "/ssd300_mAP_77.43_v2.pth"]
    )


def test_cli_list_and_unknown_name() -> None:
    listed = _run("--list")
    assert listed.returncode == 0
    for name in ("vgg16-imagenet", "ssd300-coco", "ssd300-voc"):
        assert name in listed.stdout
    unknown = _run("--list", "resnet50")
    assert unknown.returncode == 2
    assert "unknown checkpoint 'resnet50'" in unknown.stderr


# -- the catalogue against its sources and against public.toml ---------------------------------


def test_torchvision_digests_match_their_file_name_prefix() -> None:
    # torchvision names files <name>-<first 8 hex of sha256>.pth (torch.hub checks that prefix)
    for ckpt in download.CHECKPOINTS:
        if ckpt.url.startswith("https://download.pytorch.org/"):
            prefix = re.search(r"-([0-9a-f]{8})\.pth$", ckpt.filename)
            assert prefix and ckpt.sha256 and ckpt.sha256.startswith(prefix.group(1)), ckpt
        if ckpt.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", ckpt.sha256), ckpt
        assert ckpt.url.endswith("/" + ckpt.filename)


def test_public_models_file_agrees_with_the_downloader() -> None:
    entries = tomllib.loads(MODELS_TOML.read_text())["models"]
    catalogue = {c.filename: c for c in download.CHECKPOINTS}
    assert {e["weights"] for e in entries} == set(catalogue)
    for entry in entries:
        ckpt = catalogue[entry["weights"]]
        assert entry["name"] == ckpt.name
        assert entry.get("sha256") == ckpt.sha256
        if "labels_file" in entry:
            assert (MODELS_TOML.parent / entry["labels_file"]).is_file()


def test_voc_labels_file_is_the_book_order() -> None:
    from models.labels import VOC_CLASSES

    lines = (ROOT / "weights" / "voc.txt").read_text().splitlines()
    assert tuple(lines) == VOC_CLASSES
