"""The shipped ``deploy/nginx`` config, run by a real nginx in front of replicas on 127.0.0.1.

Used by ``tests/deploy/test_nginx.py`` and the balancer soak (``python -m bench.soak_lb``).
:func:`render_config` copies ``deploy/nginx/*.conf`` with only what loopback needs changed: the
listen port, the replicas' addresses (every ``server vision-N:8000`` line, in every upstream group)
and nginx's scratch folders. nginx is Debian's package (``apt-get install -y nginx``); without it
:func:`nginx_binary` raises.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bench.servers import http_get_status

REPO = Path(__file__).resolve().parents[1]
NGINX_DIR = REPO / "deploy" / "nginx"


def nginx_binary() -> str:
    """The nginx executable; RuntimeError naming the package when there is none."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        raise RuntimeError("nginx is not installed: apt-get update && apt-get install -y nginx")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def restartable_port() -> int:
    """A free port BELOW the kernel's ephemeral range, for a server that is stopped and started
    again on the same port: a port from bind(0) may meanwhile become the source port of some
    outgoing connection (nginx's connect attempts, clients), and the restart would then fail
    with "address already in use"."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def upstream_groups(upstream_conf: str) -> list[str]:
    """The names of the ``upstream`` blocks of an upstream.conf text, in order."""
    return re.findall(r"^upstream (\S+) \{", upstream_conf, flags=re.M)


def render_config(folder: Path, listen: int, replicas: Sequence[int]) -> Path:
    """deploy/nginx/*.conf as shipped, with the replicas (``vision-1`` ... in order) at
    127.0.0.1:``replicas[i]``, nginx listening on 127.0.0.1:``listen`` and its scratch folders
    inside ``folder``. Every replacement must hit as often as expected, or ValueError: the
    shipped files changed in a way this function does not know."""
    conf = (NGINX_DIR / "nginx.conf").read_text()
    upstream = (NGINX_DIR / "upstream.conf").read_text()

    def sub(pattern: str, replacement: str, text: str, expected: int = 1) -> str:
        result, count = re.subn(pattern, replacement, text, flags=re.M)
        if count != expected:
            raise ValueError(f"{pattern!r} matched {count} times in deploy/nginx, not {expected}")
        return result

    conf = sub(r"^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen};", conf)
    temps = "".join(
        f"    {kind}_temp_path {folder / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = sub(r"^http \{\n", "http {\n" + temps, conf)
    groups = len(upstream_groups(upstream))
    for index, port in enumerate(replicas, start=1):
        upstream = sub(rf"server vision-{index}:8000 ", f"server 127.0.0.1:{port} ", upstream, groups)
    if re.search(r"^\s*server vision-", upstream, flags=re.M):
        raise ValueError("upstream.conf lists more replicas than were given")
    (folder / "nginx.conf").write_text(conf)
    (folder / "upstream.conf").write_text(upstream)
    return folder / "nginx.conf"


class Nginx:
    """nginx running the rendered config in the foreground, its log in ``folder/nginx.log``.

    ``-t`` checks the config first (RuntimeError with nginx's message when it refuses it).
    """

    def __init__(self, folder: Path, replicas: Sequence[int], port: int | None = None) -> None:
        self.port = port or free_port()
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
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused deploy/nginx:\n{check.stderr}")
        # append mode: nginx writes its access log through /dev/stdout (opened O_APPEND) and its
        # error log to stderr; both must append, or one overwrites the other's lines
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_answering(self, path: str = "/health/ready", timeout_s: float = 30) -> None:
        """Wait until ``GET path`` through nginx answers 200; RuntimeError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while http_get_status(self.port, path) != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not answer {path} with 200:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
