"""Download the public checkpoints that ``weights/public.toml`` serves, verifying their SHA-256.

    python weights/download.py                  # all of them, into the folder holding this script
    python weights/download.py --list           # what would be fetched, from where, with which hash
    python weights/download.py ssd300-voc       # one of them (public.toml name or file name)
    python weights/download.py --mirror http://files.internal/ckpt/   # same files, another host

Standard library only, so it runs before (or without) ``pip install``. Each file is streamed to a
temporary file in the target folder, hashed while it arrives, and renamed over the final name only
when the SHA-256 matches; a file already present with the right hash is not fetched again. A
network failure or a hash mismatch leaves nothing behind and exits 1 with a message saying how to
bring the file by hand. Provenance and licences: ``weights/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20  # 1 MiB per read: bounded memory whatever the file size
MIB = 1 << 20
USER_AGENT = "vision-serve-weights/0.1 (python urllib)"


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable file.

    ``sha256`` is the full hex digest from a published source (see weights/README.md), or None
    where no trustworthy source publishes one: then the file is fetched unverified and its digest
    printed, for the user to pin in public.toml. ``size`` (bytes) is checked against the server's
    Content-Length before the body is read, so a wrong file fails fast.
    """

    name: str  # the public.toml entry that serves it
    filename: str
    url: str
    sha256: str | None
    size: int | None
    what: str


# Digests and sizes: weights/README.md cites where each comes from. torchvision names its files
# ``<name>-<first 8 hex of sha256>.pth`` (torch.hub.load_state_dict_from_url checks that prefix).
CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint(
        name="vgg16-imagenet",
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        size=553_433_881,
        what="torchvision VGG16, ImageNet-1k (VGG16_Weights.IMAGENET1K_V1)",
    ),
    Checkpoint(
        name="ssd300-coco",
        filename="ssd300_vgg16_coco-b556d3b4.pth",
        url="https://download.pytorch.org/models/ssd300_vgg16_coco-b556d3b4.pth",
        sha256="b556d3b43ab6c3f63d81bfb8835fe8756ac22da664357da100dccf96b6a6b42d",
        size=142_594_222,
        what="torchvision SSD300-VGG16, COCO (SSD300_VGG16_Weights.COCO_V1)",
    ),
    Checkpoint(
        name="ssd300-voc",
        filename="ssd300_mAP_77.43_v2.pth",
        url="https://s3.amazonaws.com/amdegroot-models/ssd300_mAP_77.43_v2.pth",
        sha256=None,  # amdegroot publishes no digest; see weights/README.md
        size=None,
        what="amdegroot/ssd.pytorch SSD300, VOC07+12 (the book's chapter 2 weights)",
    ),
)


class DownloadError(Exception):
    """A checkpoint could not be fetched or verified; the message says what to do."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def source_url(ckpt: Checkpoint, mirror: str | None) -> str:
    """Where to fetch ``ckpt`` from: its own URL, or ``<mirror>/<filename>``."""
    if mirror is None:
        return ckpt.url
    return urllib.parse.urljoin(mirror.rstrip("/") + "/", urllib.parse.quote(ckpt.filename))


def _by_hand(ckpt: Checkpoint, dest: Path) -> str:
    expected = ckpt.sha256 or "none published (check the file yourself, then pin it in public.toml)"
    return (
        f"Download {ckpt.filename} from {ckpt.url} on a machine that has network access and copy it "
        f"to {dest}; expected sha256 {expected}"
    )


def fetch(ckpt: Checkpoint, folder: Path, *, mirror: str | None = None, timeout: float = 30.0) -> str:
    """Make ``folder/ckpt.filename`` exist with the right content; return a one-line status.

    Raises DownloadError (nothing left behind) when the file cannot be fetched or does not match.
    """
    dest = folder / ckpt.filename
    if dest.is_file():
        actual = sha256_of(dest)
        if ckpt.sha256 is None:
            return f"{ckpt.name}: present, not verified (no published sha256); sha256 {actual}"
        if actual == ckpt.sha256:
            return f"{ckpt.name}: present, sha256 verified"
        print(
            f"{ckpt.name}: {dest} has sha256 {actual}, expected {ckpt.sha256}; fetching it again",
            file=sys.stderr,
        )

    url = source_url(ckpt, mirror)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{ckpt.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(ckpt, url, out, dest, timeout)
            out.flush()
            os.fsync(out.fileno())
        if ckpt.sha256 is not None and actual != ckpt.sha256:
            raise DownloadError(
                f"{ckpt.name}: sha256 mismatch for {url}: expected {ckpt.sha256}, got {actual}; "
                f"the download was discarded. {_by_hand(ckpt, dest)}"
            )
        tmp.chmod(0o644)  # mkstemp makes 0600; the container's non-root user must read it
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if ckpt.sha256 is None:
        return f"{ckpt.name}: downloaded, not verified (no published sha256); sha256 {actual}"
    return f"{ckpt.name}: downloaded, sha256 verified"


def _stream(ckpt: Checkpoint, url: str, out: BinaryIO, dest: Path, timeout: float) -> str:
    """Copy ``url`` into the open binary file ``out``; return the hex SHA-256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else ckpt.size
            if ckpt.size is not None and length and length.isdigit() and int(length) != ckpt.size:
                raise DownloadError(
                    f"{ckpt.name}: {url} offers {int(length)} bytes, expected {ckpt.size}: not the "
                    f"published file; nothing was kept. {_by_hand(ckpt, dest)}"
                )
            done = 0
            next_report = 0.0
            while chunk := response.read(CHUNK_BYTES):
                done += len(chunk)
                if ckpt.size is not None and done > ckpt.size:
                    raise DownloadError(
                        f"{ckpt.name}: {url} sent more than the expected {ckpt.size} bytes; nothing "
                        f"was kept. {_by_hand(ckpt, dest)}"
                    )
                digest.update(chunk)
                out.write(chunk)
                if total and done / total >= next_report:
                    print(f"{ckpt.name}: {done / MIB:.1f}/{total / MIB:.1f} MiB", file=sys.stderr)
                    next_report += 0.1
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"{ckpt.name}: {url} answered HTTP {exc.code} {exc.reason}. {_by_hand(ckpt, dest)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:  # DNS, refused, reset, timeout
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DownloadError(
            f"{ckpt.name}: no network: could not fetch {url} ({reason}). {_by_hand(ckpt, dest)}"
        ) from exc
    return digest.hexdigest()


def select(names: Sequence[str]) -> list[Checkpoint]:
    """The checkpoints named (public.toml name or file name); all of them when ``names`` is empty."""
    if not names:
        return list(CHECKPOINTS)
    chosen: list[Checkpoint] = []
    for wanted in names:
        match = [c for c in CHECKPOINTS if wanted in (c.name, c.filename)]
        if not match:
            known = ", ".join(c.name for c in CHECKPOINTS)
            raise KeyError(f"unknown checkpoint {wanted!r}; known: {known}")
        chosen.extend(c for c in match if c not in chosen)
    return chosen


def describe(ckpt: Checkpoint) -> str:
    size = f"{ckpt.size:,} bytes" if ckpt.size is not None else "size not published"
    digest = ckpt.sha256 or "not published (unverified download)"
    return (
        f"{ckpt.name}\n  file   {ckpt.filename} ({size})\n  url    {ckpt.url}\n"
        f"  sha256 {digest}\n  what   {ckpt.what}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python weights/download.py",
        description="Download the public checkpoints served by weights/public.toml, verifying SHA-256.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help="public.toml name or file name (default: all)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="target folder (default: the folder holding this script)",
    )
    parser.add_argument("--list", action="store_true", help="show the checkpoints and exit")
    parser.add_argument(
        "--mirror",
        metavar="URL",
        help="fetch <URL>/<file name> instead of each file's own URL (same hashes are checked)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per network operation (default 30)"
    )
    args = parser.parse_args(argv)

    try:
        chosen = select(args.names)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.list:
        print("\n".join(describe(c) for c in chosen))
        return 0

    failures = 0
    for ckpt in chosen:
        try:
            print(fetch(ckpt, args.dir, mirror=args.mirror, timeout=args.timeout))
        except DownloadError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    if failures:
        print(f"{failures} of {len(chosen)} checkpoint(s) not installed in {args.dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
