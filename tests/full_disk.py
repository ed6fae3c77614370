"""A real full disk for tests: a small tmpfs mounted and filled (mounting needs root, as in CI; else skip)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def full_disk_at(directory: Path, size: str = "8m", leave: int = 8192) -> Iterator[Path]:
    """A real tmpfs mounted at `directory` (created), filled by `filler` up to `leave` bytes; unmounted
    afterwards. Mounting needs root (as in CI); elsewhere the test skips."""
    directory.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({(res.stderr or res.stdout).strip()}); needs root")
    try:
        st = os.statvfs(directory)
        (directory / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
