"""``python -m app`` as a real process on 127.0.0.1: start, wait for ready, real JPEGs over real
HTTP, SIGTERM; and the start failures (exit code and one clear message on stderr)."""

from __future__ import annotations

import base64
import importlib.resources
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import checkpoint_factory as cf
from tests.app.harness import CLASSIFIER, DETECTOR, VOC_DETECTOR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def photo_bytes(name: str) -> bytes:
    """A real photo shipped with scikit-learn (640x427 JPEG)."""
    return (importlib.resources.files("sklearn.datasets") / "images" / name).read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISION_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(values)
    return env


def run_app(env: dict[str, str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "--port", str(free_port())],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Server:
    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log


@pytest.fixture(scope="module")
def server(tiny_models_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    env = clean_env(
        VISION_MODELS_FILE=str(tiny_models_file),
        VISION_DEVICE="cpu",
        VISION_MAX_BATCH_SIZE="2",
        VISION_TORCH_THREADS="1",
    )
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"server exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in time:\n{log.read_text()}"
            time.sleep(0.2)
        yield Server(process, base_url, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_the_start_tuned_glibc_malloc(server: Server) -> None:
    # python -m app re-executes itself (same pid) with the allocator variables (app/allocator.py)
    environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    assert b"MALLOC_MMAP_MAX_=0" in environ
    assert any(item.startswith(b"MALLOC_TRIM_THRESHOLD_=") for item in environ)


def test_real_jpegs_over_real_http(server: Server) -> None:
    china, flower = photo_bytes("china.jpg"), photo_bytes("flower.jpg")
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        names = [m["name"] for m in client.get("/v1/models").json()["models"]]
        assert names == [CLASSIFIER, DETECTOR, VOC_DETECTOR]

        both = client.post(
            "/v1/classify",
            files=[
                ("file", ("china.jpg", china, "image/jpeg")),
                ("file", ("flower.jpg", flower, "image/jpeg")),
            ],
            headers={"X-Request-ID": "real-1"},
        )
        assert both.status_code == 200 and both.headers["x-request-id"] == "real-1"
        assert [r["image"] for r in both.json()["results"]] == [{"width": 640, "height": 427}] * 2

        raw = client.post("/v1/detect", content=china, headers={"Content-Type": "image/jpeg"})
        assert raw.status_code == 200 and raw.json()["model"] == DETECTOR
        for d in raw.json()["results"][0]["detections"]:
            assert 0 <= d["box"]["x1"] < d["box"]["x2"] <= 640 and 0 <= d["box"]["y1"] < d["box"]["y2"] <= 427

        as_json = client.post(
            f"/v1/models/{VOC_DETECTOR}/predict", json={"image": base64.b64encode(flower).decode()}
        )
        assert as_json.status_code == 200 and as_json.json()["model"] == VOC_DETECTOR

        assert client.get("/nope").json()["code"] == "NOT_FOUND"
        assert f'vision_requests_total{{endpoint="/v1/classify",model="{CLASSIFIER}",status="200"}} 1.0' in (
            client.get("/metrics").text
        )


def test_declared_oversize_body_is_refused_without_sending_it(server: Server) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 500000000\r\n\r\n"
        )  # 500 MB announced, none sent
        answer = b""
        while b"PAYLOAD_TOO_LARGE" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        answer_text = answer.decode("latin-1")
    assert answer_text.startswith("HTTP/1.1 413"), answer_text
    assert "PAYLOAD_TOO_LARGE" in answer_text


def test_idle_keep_alive_connection_outlives_uvicorns_five_seconds(server: Server) -> None:
    """VISION_KEEP_ALIVE_S (75 s) above a balancer's idle timeout: a connection idle for 6 s is
    still open, so a request sent on it is answered (uvicorn's default of 5 s would have closed it
    and the request would fail as the balancer sends it)."""
    import http.client

    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/health/live")
        first = connection.getresponse()
        assert first.status == 200 and first.getheader("connection", "keep-alive") != "close"
        first.read()
        local = connection.sock.getsockname()
        time.sleep(6)
        connection.request("GET", "/health/live")  # http.client reconnects silently if it was closed
        second = connection.getresponse()
        second.read()
        assert second.status == 200 and connection.sock.getsockname() == local  # the same connection
    finally:
        connection.close()


def test_sigterm_stops_cleanly_and_the_log_has_one_line_per_request(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        client.post(
            "/v1/classify",
            content=photo_bytes("china.jpg"),
            headers={"X-Request-ID": "last-one", "Content-Type": "image/jpeg"},
        )
    server.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says "terminated"
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    log = server.log.read_text()
    assert "app.inference: stopped" in log and "Application shutdown complete" in log
    assert "POST /v1/classify 200" in log and "id=last-one" in log
    assert "Traceback" not in log


# -- start failures -------------------------------------------------------------------------------


def test_bad_setting_exits_2_with_one_line() -> None:
    result = run_app(clean_env(VISION_MAX_FILES="lots"))
    assert result.returncode == 2
    assert "VISION_MAX_FILES" in result.stderr and "Traceback" not in result.stderr
    int8 = run_app(clean_env(VISION_PRECISION="int8", VISION_DEVICE="cuda"))
    assert int8.returncode == 2 and "CPU only" in int8.stderr and "Traceback" not in int8.stderr
    typo = run_app(clean_env(VISION_MAX_BATCH="16"))
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1, typo.stderr
    assert "VISION_MAX_BATCH is not a setting; did you mean VISION_MAX_BATCH_SIZE?" in typo.stderr


def test_bad_models_file_exits_non_zero_naming_file_and_entry(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nname = "x"\ntask = "classify"\narch = "resnet50"\nformat = "torchvision"\n'
        'weights = "w.pth"\n'
    )
    result = run_app(clean_env(VISION_MODELS_FILE=str(models)))
    assert result.returncode == 1
    assert str(models) in result.stderr and "models[0] ('x')" in result.stderr and "resnet50" in result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_checkpoint_exits_non_zero_with_the_models_message(tmp_path: Path) -> None:
    good = cf.write_torchvision_vgg16(tmp_path / "good.pth", width=1 / 16)
    cf.write_truncated(tmp_path / "cut.pth", good)
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nname = "cut"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "cut.pth"\n'
    )
    result = run_app(clean_env(VISION_MODELS_FILE=str(models)))
    assert result.returncode == 1
    assert "cut.pth" in result.stderr and "Traceback" not in result.stderr
    # the models load after the socket opens: the start's log lines, the failure logged once as an
    # ERROR, and the one message last, where a person looks
    *log_lines, last = result.stderr.strip().splitlines()
    assert last.startswith("vision-serve: ") and "cut.pth" in last, result.stderr
    assert [line for line in log_lines if "cut.pth" in line and " ERROR " in line], result.stderr


def test_public_models_file_without_checkpoints_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "public.toml").write_text((REPO / "weights" / "public.toml").read_text())
    (tmp_path / "weights" / "voc.txt").write_text((REPO / "weights" / "voc.txt").read_text())
    result = run_app(clean_env(VISION_MODELS_FILE="weights/public.toml"), cwd=tmp_path)
    assert result.returncode == 1
    assert "checkpoint file(s) not found" in result.stderr
    assert "python weights/download.py" in result.stderr and "VISION_MODELS_FILE" in result.stderr
    assert "weights/README.md" in result.stderr and "Traceback" not in result.stderr


def test_default_models_file_without_demo_checkpoints_says_the_checkout_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "models.toml").write_text((REPO / "weights" / "models.toml").read_text())
    result = run_app(clean_env(), cwd=tmp_path)  # VISION_MODELS_FILE unset: the default file
    assert result.returncode == 1
    assert "checkpoint file(s) not found" in result.stderr and "shapes-vgg16-bn" in result.stderr
    assert "git checkout -- weights/demo" in result.stderr and "Traceback" not in result.stderr
