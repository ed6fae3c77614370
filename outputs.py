"""Output files: written whole or not at all, and file-system failures (a full disk above all) in one line.

Why: a plan, report or export that a crash or a full disk cut short must never sit at the destination looking
complete, and a user who runs out of space needs the file and the fix, not a traceback. Every stage writes its
small outputs through `write_atomic` and turns an OSError into `os_error_line` at its CLI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_HINTS = {
    errno.EACCES: "permission denied; choose a writable output path",
    errno.EPERM: "permission denied; choose a writable output path",
    errno.EROFS: "read-only file system; choose a writable output path",
    errno.EFBIG: "file too large for this file system; write it to another one",
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside `path` for a writer that wants a file name; renamed into place when the block ends
    cleanly, removed otherwise (an OSError then names `path`, not the temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise at_destination(e, path) from e
        raise


def at_destination(e: OSError, path: str | os.PathLike) -> OSError:
    """The same error naming the output `path`: a failure inside a temp file or directory (or a copy, which names
    its source) is the destination's problem for the user."""
    return OSError(e.errno, e.strerror, str(path))


def write_atomic(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write `data` to a temp file beside `path`, then rename it into place; on any failure the temp file is
    removed and `path` keeps what it held before."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, or sqlite's own report of them (it raises OperationalError, not OSError)."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    return isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e)


def out_of_space(directory: str | os.PathLike, below: int = 1 << 20) -> bool:
    """Less than `below` bytes free where `directory` lives: sqlite reports a full disk that its shared-memory
    file could not grow on as a plain "disk I/O error", which this tells apart."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < below


def os_error_line(e: BaseException) -> str:
    """One line naming the file (when the error has one) and the fix."""
    name = getattr(e, "filename", None)
    where = f"{name}: " if name else ""
    if is_disk_full(e):
        return f"{where}no space left on device; free some space or choose an output path on another disk"
    if isinstance(e, OSError) and e.errno in _HINTS:
        return f"{where}{_HINTS[e.errno]}"
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"{where}{reason}"
