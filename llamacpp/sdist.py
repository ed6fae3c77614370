"""The pinned llama.cpp sources, from the llama-cpp-python sdist on PyPI (it vendors llama.cpp at a known commit).

Downloaded once into the cache with pip (so it honours the user's index and proxy settings) and extracted
on demand: just the converter sources, or the whole tree for a cmake build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llamacpp import PINNED_LLAMA_CPP_PYTHON

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-strategy"
_TOP = f"llama_cpp_python-{PINNED_LLAMA_CPP_PYTHON}"
_VENDOR = f"{_TOP}/vendor/llama.cpp/"


class ProvisionError(RuntimeError):
    pass


def sdist_path(download_dir: Path | None = None) -> Path:
    """Path of the pinned sdist, downloading it with pip the first time."""
    candidates = [Path(os.environ["LLAMA_CPP_SDIST"])] if os.environ.get("LLAMA_CPP_SDIST") else []
    dl = download_dir or CACHE_ROOT / "dl"
    candidates += [dl / f"{_TOP}.tar.gz", Path.home() / ".cache" / "llama-cpp-ref" / "dl" / f"{_TOP}.tar.gz"]
    for c in candidates:
        if c.is_file() and c.stat().st_size > 0:
            return c
    dl.mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp sources: downloading llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON} sdist into {dl} "
          "(first run only)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}", "-d", str(dl)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    target = dl / f"{_TOP}.tar.gz"
    if res.returncode != 0 or not target.is_file():
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProvisionError(f"could not download the llama-cpp-python sdist with pip ({last[0]}); "
                             f"pass --llama-cpp DIR (a llama.cpp checkout) or set LLAMA_CPP_SDIST=FILE")
    return target


def extract(dest: Path, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> Path:
    """Extract vendor/llama.cpp (or only the listed top-level entries of it) into dest, atomically."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(sdist_path()) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(_VENDOR):
                    continue
                rel = m.name[len(_VENDOR):]
                if only is not None and not any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in only):
                    continue
                if any(rel.startswith(x) for x in exclude) or rel == ".git":
                    continue
                m.name = rel
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        commit = _vendored_commit()
        if commit:
            (tmp / ".llama-commit").write_text(commit)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _vendored_commit() -> str | None:
    with tarfile.open(sdist_path()) as tar:
        try:
            f = tar.extractfile(f"{_TOP}/.git/modules/vendor/llama.cpp/HEAD")
        except KeyError:
            return None
        return f.read(40).decode() if f else None
