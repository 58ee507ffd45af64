"""A disk that really fills: a small tmpfs mounted for the test (root only), filled to its last byte
by a ballast file and freed by deleting it. The kernel's own ENOSPC, with no write intercepted."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int = 64) -> Iterator[Path]:
    """A `size_mb` tmpfs at `path` for the block, unmounted after (lazily: a job may still hold a file)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False, timeout=30)


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte; the ballast file (delete it to free the space)."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return ballast
