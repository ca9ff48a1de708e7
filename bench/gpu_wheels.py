"""``python -m bench.gpu_wheels``: the wheels a bare GPU machine lacks to run ``bench/gpu.sh``.

The GPU machines this project borrows cannot reach a package index. Their image has Python 3.12
with torch, torchvision, numpy, pillow, scikit-learn and many other packages, but not this
service's web stack (FastAPI, pydantic, uvicorn, python-multipart, ...) nor pytest-asyncio. This
command downloads, here, the wheels of the service's and the tests' pure dependencies at the very
versions installed in this environment (the ones CI tests), for CPython 3.12 on manylinux x86-64,
into ``--dest`` (default ``.whl/``, ignored by git). ``bench/gpu.sh`` installs whatever is there
into a private folder first.

Which distributions: the closure of :data:`ROOTS` over their requirements (extras and markers
evaluated for Linux, CPython 3.12), less :data:`PROVIDED` (what the machine's image has, and must
keep: a second torch would not fit the 64 MiB a run may carry, nor match its CUDA driver).

    .venv/bin/python -m bench.gpu_wheels            # ~25 wheels, ~10 MB
    .venv/bin/python -m bench.gpu_wheels --list     # print the pins only
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: What the service and its GPU checks import, beyond the machine's image (``uvicorn[standard]``'s
#: HTTP parser included: the service runs with httptools where it is installed).
ROOTS: tuple[str, ...] = (
    "fastapi",
    "uvicorn",
    "httptools",
    "pydantic",
    "pydantic-settings",
    "python-multipart",
    "prometheus-client",
    "httpx",
    "pytest",
    "pytest-asyncio",
)

#: Kept from the machine's image: large, compiled against its CUDA, or needed as they are there.
PROVIDED: frozenset[str] = frozenset(
    canonicalize_name(n)
    for n in (
        "torch",
        "torchvision",
        "triton",
        "numpy",
        "pillow",
        "scikit-learn",
        "scipy",
        "setuptools",
        "uvloop",
        "matplotlib",
    )
)

#: pip's platform tags for the machine (glibc 2.17 .. 2.39 wheels all run there).
PLATFORMS: tuple[str, ...] = (
    *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
PYTHON_VERSION = "3.12"


def target_environment() -> dict[str, str]:
    """Marker values of the GPU machine: Linux x86-64, CPython 3.12."""
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=PYTHON_VERSION,
        python_full_version=f"{PYTHON_VERSION}.3",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def closure(roots: Iterable[str], provided: frozenset[str] = PROVIDED) -> dict[str, str]:
    """{distribution name: installed version} for ``roots`` and everything they require here (with
    the extras named on the way), minus ``provided``. Raises LookupError naming a requirement that is
    not installed in this environment."""
    env = target_environment()
    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen or key[0] in provided:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise LookupError(f"{name} is required but not installed in {sys.prefix}") from e
        pins[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [{**env, "extra": extra} for extra in extras or {""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in wanted):
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(pins.items()))


def download(pins: dict[str, str], dest: Path) -> int:
    """``pip download`` each pin for the machine's platform into ``dest``; pip's exit status."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    argv += [f"{name}=={version}" for name, version in pins.items()]
    return subprocess.run(argv, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--list", action="store_true", help="print the pins, download nothing")
    args = parser.parse_args(argv)
    pins = closure(ROOTS)
    for name, version in pins.items():
        print(f"{name}=={version}")
    if args.list:
        return 0
    stale = [p for p in args.dest.glob("*.whl") if canonicalize_name(p.name.split("-")[0]) not in pins]
    for path in stale:  # two versions of one package stop the install there
        path.unlink()
    return download(pins, args.dest)


if __name__ == "__main__":
    sys.exit(main())
