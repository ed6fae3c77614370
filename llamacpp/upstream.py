"""Make llama.cpp's own converter package (`conversion/`, `gguf-py/`) importable, at the pinned version.

We build on upstream instead of copying it: the converter subclasses upstream's model classes, and the
catalog runs upstream's tensor transforms. Upstream's `conversion` needs its own gguf-py (it differs from PyPI's
gguf 0.19.0), so `activate` puts that first and re-registers our quantizers into it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llamacpp import PINNED_LLAMA_CPP_COMMIT
from llamacpp.reference import DEFAULT_PREFIX
from llamacpp.sdist import CACHE_ROOT, extract

_NEEDED = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "models/templates", "LICENSE")


class UpstreamNotFound(RuntimeError):
    pass


def _is_source_dir(d: Path) -> bool:
    return (d / "conversion" / "__init__.py").is_file() and (d / "gguf-py" / "gguf" / "__init__.py").is_file()


def find_sources(llama_cpp_dir: str | os.PathLike | None = None, provision: bool = True) -> Path:
    """Directory holding upstream `conversion/` and `gguf-py/`.

    Order: the given dir (a llama.cpp checkout, or a reference prefix with src/), $LLAMA_CPP_DIR, the reference
    build's src/ (same pinned commit), our cache; else provision from the pinned sdist (first run only).
    """
    explicit = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if explicit:
        d = Path(explicit).expanduser()
        for cand in (d, d / "src"):
            if _is_source_dir(cand):
                return cand.resolve()
        raise UpstreamNotFound(f"{d}: no llama.cpp converter sources there (expected conversion/ and gguf-py/); "
                               "pass the root of a llama.cpp checkout")
    cached = CACHE_ROOT / f"llama.cpp-{PINNED_LLAMA_CPP_COMMIT[:8]}-src"
    for cand in (DEFAULT_PREFIX / "src", cached):
        if _is_source_dir(cand):
            return cand
    if not provision:
        raise UpstreamNotFound("llama.cpp converter sources not found; pass --llama-cpp DIR")
    print(f"llama.cpp converter sources: extracting commit {PINNED_LLAMA_CPP_COMMIT[:8]} into {cached}",
          file=sys.stderr)
    return extract(cached, only=_NEEDED)


def activate(llama_cpp_dir: str | os.PathLike | None = None) -> Path:
    """Put upstream's sources first on sys.path, swap in its gguf module, register our quantizers; idempotent."""
    src = find_sources(llama_cpp_dir)
    gguf_py = src / "gguf-py"
    for p in (str(gguf_py), str(src)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    loaded = sys.modules.get("gguf")
    if loaded is not None and not Path(loaded.__file__).resolve().is_relative_to(gguf_py.resolve()):
        for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
            del sys.modules[name]
    import gguf

    import quants

    quants.register(gguf)
    return src
