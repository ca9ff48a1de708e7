"""glibc malloc tuning applied by the service's own start.

A VGG16/SSD forward allocates and frees activation buffers of tens to hundreds of MB per batch.
glibc serves those from fresh ``mmap`` regions and returns them on ``free``, so every batch pays
page faults for memory it just gave back. With ``mmap`` off for large blocks and no heap trimming,
the buffers stay mapped and are reused. The price is that resident memory stays at its peak, which
is what a long-running model server holds anyway.

glibc reads these variables once, at process start, so ``python -m app`` re-executes itself with
them when they are missing. Values the user set are kept; ``VISION_ALLOCATOR_TUNING=false`` turns
the whole thing off. Other C libraries (musl) ignore the variables: nothing is done there.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

#: mallopt settings as environment variables (glibc ``mallopt(3)``: M_MMAP_MAX, M_TRIM_THRESHOLD).
TUNING: dict[str, str] = {
    "MALLOC_MMAP_MAX_": "0",  # never serve an allocation with its own mmap
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),  # never give the top of the heap back (16 GiB)
}


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing needs to change."""
    if platform.libc_ver()[0] != "glibc":
        return None
    missing = {name: value for name, value in TUNING.items() if name not in environ}
    if not missing:
        return None
    return {**environ, **missing}


def reexec_with_tuning(argv: Sequence[str]) -> None:
    """Replace this process with ``python -m app ARGV`` under the tuned environment, if needed.

    Call it before anything heavy is imported. Returns only when no re-exec is needed.
    """
    env = tuned_environ(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "app", *argv], env)
