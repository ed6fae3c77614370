"""Locate the reference llama.cpp build (llama-quantize, llama-perplexity, libggml-base.so).

Lookup order: an explicit directory, $LLAMA_CPP_REF, the default cache (~/.cache/llama-cpp-ref),
then PATH for the binaries. Building on demand lives in `llamacpp.build`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-cpp-ref"

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split")


class ReferenceNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Reference:
    """Paths of one llama.cpp build; any of them may be None when that piece is missing."""

    prefix: Path | None
    bin_dir: Path | None
    lib_dir: Path | None

    def tool(self, name: str) -> Path:
        if self.bin_dir is not None and (self.bin_dir / name).is_file():
            return self.bin_dir / name
        found = shutil.which(name)
        if found:
            return Path(found)
        raise ReferenceNotFound(
            f"{name} not found (looked in {self.bin_dir} and PATH); build it with "
            f"`python -m llamacpp.build` or pass --llama-cpp DIR"
        )

    def libggml_base(self) -> Path:
        for d in filter(None, (self.lib_dir, self.bin_dir)):
            for cand in ("libggml-base.so", "libggml-base.dylib"):
                if (d / cand).is_file():
                    return d / cand
        raise ReferenceNotFound(
            f"libggml-base.so not found in {self.lib_dir}; build it with `python -m llamacpp.build`"
        )


def _from_prefix(prefix: Path) -> Reference:
    bin_dir = prefix / "bin"
    if not bin_dir.is_dir():  # a plain llama.cpp cmake build dir keeps everything in build/bin
        bin_dir = prefix / "build" / "bin" if (prefix / "build" / "bin").is_dir() else prefix
    lib_dir = prefix / "lib" if (prefix / "lib").is_dir() else bin_dir
    return Reference(prefix=prefix, bin_dir=bin_dir, lib_dir=lib_dir)


def find_reference(explicit: str | os.PathLike | None = None) -> Reference:
    """The first llama.cpp build found; raises ReferenceNotFound naming where it looked."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("LLAMA_CPP_REF"):
        candidates.append(Path(os.environ["LLAMA_CPP_REF"]))
    candidates.append(DEFAULT_PREFIX)
    for prefix in candidates:
        ref = _from_prefix(prefix.expanduser())
        if ref.bin_dir is not None and any((ref.bin_dir / t).is_file() for t in TOOLS):
            return ref
    if shutil.which("llama-quantize"):
        bin_dir = Path(shutil.which("llama-quantize")).parent  # type: ignore[arg-type]
        lib_dir = bin_dir.parent / "lib" if (bin_dir.parent / "lib").is_dir() else bin_dir
        return Reference(prefix=bin_dir.parent, bin_dir=bin_dir, lib_dir=lib_dir)
    raise ReferenceNotFound(
        "no llama.cpp build found (looked in " + ", ".join(str(c) for c in candidates) + " and PATH); "
        "build one with `python -m llamacpp.build` or pass --llama-cpp DIR"
    )
