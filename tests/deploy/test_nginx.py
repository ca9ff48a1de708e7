"""Two real replicas behind a real nginx running deploy/nginx/nginx.conf, on 127.0.0.1.

Under a steady client load through nginx: one replica is drained (SIGTERM) and started again, the
other is killed (SIGKILL, a crash) and started again, as the orchestrator's restart policy would.
The clients see no failed request, and each restarted replica takes traffic again.

nginx is a Debian package (``apt-get install -y nginx``; ``.ci/run`` installs it): without it this
test fails, it does not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.app.helpers import jpeg
from tests.app.test_server_process import free_port
from tests.deploy.replicas import REPO, Load, Replica, service_env, tiny_classifier_file, wait_for

pytestmark = pytest.mark.slow

NGINX_DIR = REPO / "deploy" / "nginx"
DRAIN_DELAY_S = 1.0
DRAIN_GRACE_S = 10.0


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        pytest.fail("nginx is not installed: apt-get update && apt-get install -y nginx (.ci/run does this)")
    return found


def render_config(folder: Path, listen: int, replicas: list[int]) -> Path:
    """deploy/nginx/*.conf as shipped, with the replicas and the listen port pointed at loopback
    and nginx's scratch folders inside ``folder``. Each substitution must hit exactly once."""
    conf = (NGINX_DIR / "nginx.conf").read_text()
    upstream = (NGINX_DIR / "upstream.conf").read_text()

    def sub(pattern: str, replacement: str, text: str) -> str:
        result, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == 1, f"{pattern!r} matched {count} times in deploy/nginx: update this test"
        return result

    conf = sub(r"^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen};", conf)
    temps = "".join(
        f"    {kind}_temp_path {folder / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = sub(r"^http \{\n", "http {\n" + temps, conf)
    for index, port in enumerate(replicas, start=1):
        upstream = sub(rf"server vision-{index}:8000 ", f"server 127.0.0.1:{port} ", upstream)
    assert not re.search(r"^\s*server vision-", upstream, flags=re.M), (
        "more replicas in upstream.conf than here"
    )
    (folder / "nginx.conf").write_text(conf)
    (folder / "upstream.conf").write_text(upstream)
    return folder / "nginx.conf"


class Nginx:
    def __init__(self, folder: Path, replicas: list[int]) -> None:
        self.port = free_port()
        self.folder = folder
        self.config = render_config(folder, self.port, replicas)
        self.log = folder / "nginx.log"
        globals_ = f"daemon off; pid {folder / 'nginx.pid'};" + (" user root;" if os.geteuid() == 0 else "")
        self.argv = [
            nginx_binary(),
            "-p",
            str(folder),
            "-c",
            str(self.config),
            "-e",
            "stderr",
            "-g",
            globals_,
        ]
        check = subprocess.run([*self.argv, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx -t refused deploy/nginx:\n{check.stderr}"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[Replica]]]:
    folder = tmp_path_factory.mktemp("lb")
    env = service_env(
        tiny_classifier_file(folder), drain_delay_s=str(DRAIN_DELAY_S), drain_grace_s=str(DRAIN_GRACE_S)
    )
    replicas = [Replica(f"replica-{i}", env, folder) for i in (1, 2)]
    nginx: Nginx | None = None
    try:
        for r in replicas:
            r.start()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.wait_ready(), replicas))
        nginx = Nginx(folder, [r.port for r in replicas])
        wait_for(lambda: _status(f"{nginx.url}/health/ready") == 200, "nginx to answer", timeout=30)
        yield nginx, replicas
    finally:
        if nginx is not None:
            nginx.close()
        for r in replicas:
            r.close()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_nginx_limits_agree_with_the_service(cluster: tuple[Nginx, list[Replica]]) -> None:
    nginx, _ = cluster
    conf = (NGINX_DIR / "nginx.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)m;", conf)
    assert limit is not None
    from app.settings import Settings

    assert int(limit.group(1)) * 1024 * 1024 == Settings.model_fields["max_body_bytes"].default
    # nginx refuses a body over it with the service's JSON error body
    too_big = httpx.post(
        f"{nginx.url}/v1/classify",
        content=b"\0" * (int(limit.group(1)) * 1024 * 1024 + 1),
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "big-1"},
        timeout=60,
    )
    assert too_big.status_code == 413
    assert too_big.json() == {
        "error": "request body is larger than the limit of 20 MiB",
        "code": "PAYLOAD_TOO_LARGE",
        "request_id": "big-1",
    }
    # the request id goes through to the replica and back
    answer = httpx.post(
        f"{nginx.url}/v1/classify",
        content=jpeg(),
        headers={"Content-Type": "image/jpeg", "X-Request-ID": "via-lb"},
    )
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "via-lb"
    assert answer.json()["request_id"] == "via-lb"


def test_drain_and_crash_under_load_lose_no_request(cluster: tuple[Nginx, list[Replica]]) -> None:
    nginx, (drained, crashed) = cluster
    image = jpeg(96, 72, seed=7)
    with Load(f"{nginx.url}/v1/classify", image, clients=3) as load:
        wait_for(lambda: drained.served() > 0 and crashed.served() > 0, "both replicas to take requests")

        # a deploy: SIGTERM, drained, started again on the same port
        before = load.count(200)
        drained.signal(signal.SIGTERM)
        code = drained.wait(timeout=DRAIN_DELAY_S + DRAIN_GRACE_S + 30)
        assert code in (0, -signal.SIGTERM), drained.log.read_text()[-2000:]
        assert load.count(200) > before, "the load stalled while a replica drained"
        drained.start()
        drained.wait_ready()
        wait_for(lambda: drained.served() > 0, "the restarted replica to take traffic again", timeout=90)

        # a crash: SIGKILL mid-load, then the restart policy's new process
        crashed.signal(signal.SIGKILL)
        assert crashed.wait(timeout=30) == -signal.SIGKILL
        during = load.count(200)
        wait_for(lambda: load.count(200) > during + 20, "requests to flow past the dead replica", timeout=60)
        crashed.start()
        crashed.wait_ready()
        wait_for(
            lambda: crashed.served() > 0, "the crashed replica, restarted, to take traffic again", timeout=90
        )
        outcomes = load.stop()

    failures = [o for o in outcomes if o.status != 200]
    if failures:  # what nginx saw of them, for the failure message
        ids = {o.request_id for o in failures}
        lines = [line for line in nginx.log.read_text().splitlines() if any(i in line for i in ids)]
        raise AssertionError(
            f"{len(failures)} of {len(outcomes)} failed, e.g. {failures[:5]}; nginx: {lines[:5]}"
        )
    assert len(outcomes) > 100
    retried = [
        line for line in nginx.log.read_text().splitlines() if re.search(r"upstream_status=\S+, ", line)
    ]
    print(f"{len(outcomes)} requests through nginx, all 200; {len(retried)} retried on the other replica")


def test_nginx_answers_503_json_when_no_replica_is_up(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path, [free_port(), free_port()])  # nothing listens there
    try:
        wait_for(lambda: _status(f"{nginx.url}/health/live") != 0, "nginx to start", timeout=30)
        response = httpx.post(
            f"{nginx.url}/v1/classify",
            content=jpeg(),
            headers={"Content-Type": "image/jpeg", "X-Request-ID": "r-1"},
        )
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["code"] == "UNAVAILABLE" and response.json()["request_id"] == "r-1"
    finally:
        nginx.close()
