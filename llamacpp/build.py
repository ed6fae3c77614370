"""Build the reference llama.cpp tools (llama-quantize, llama-perplexity, llama-imatrix, libggml) with cmake.

They are the ground truth for parity tests and the llama.cpp verify engine; the toolkit itself never needs
them. Same pinned commit as the converter sources, cached (default ~/.cache/llama-cpp-ref), idempotent.

    python -m llamacpp.build [--prefix DIR] [--jobs N] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llamacpp import PINNED_LLAMA_CPP_COMMIT, PINNED_LLAMA_CPP_PYTHON
from llamacpp.reference import DEFAULT_PREFIX, TOOLS
from llamacpp.sdist import ProvisionError, extract

LIBS = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so")


def is_built(prefix: Path) -> bool:
    return (all((prefix / "bin" / t).is_file() for t in TOOLS)
            and all((prefix / "lib" / lib).exists() for lib in LIBS)
            and (prefix / "src" / "conversion").is_dir())


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ProvisionError(f"{cmd[0]} failed (exit {res.returncode}); last lines of {log}:\n" + "\n".join(tail))


def build(prefix: Path = DEFAULT_PREFIX, jobs: int | None = None, force: bool = False) -> Path:
    prefix = prefix.expanduser().resolve()
    if is_built(prefix) and not force:
        print(f"reference llama.cpp already built in {prefix}", file=sys.stderr)
        return prefix
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ProvisionError(f"'{tool}' not found; install cmake and a C++ compiler (apt-get install cmake g++)")
    prefix.mkdir(parents=True, exist_ok=True)
    tree = extract(prefix / "llama.cpp", exclude=("docs/", "models/ggml-vocab-"))
    build_dir = prefix / "build"
    log = prefix / "build.log"
    short = PINNED_LLAMA_CPP_COMMIT[:8]
    jobs = jobs or os.cpu_count() or 2
    print(f"building reference llama.cpp {short} into {prefix} with -j{jobs} (a few minutes, once; log: {log})",
          file=sys.stderr)
    if not (build_dir / "CMakeCache.txt").is_file():
        _run(["cmake", "-S", str(tree), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_CPU=ON", "-DGGML_CUDA=OFF",
              "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF", "-DLLAMA_CURL=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              f"-DLLAMA_BUILD_COMMIT={short}", "-DLLAMA_BUILD_NUMBER=0", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
              "-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib"], log)
    _run(["cmake", "--build", str(build_dir), "--config", "Release", f"-j{jobs}", "--target",
          "ggml-base", "ggml-cpu", "ggml", "llama", *TOOLS], log)
    for sub in ("bin", "lib", "include"):
        (prefix / sub).mkdir(exist_ok=True)
    for t in TOOLS:
        shutil.copy2(build_dir / "bin" / t, prefix / "bin" / t)
    for so in (build_dir / "bin").glob("lib*.so*"):
        dst = prefix / "lib" / so.name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if so.is_symlink():
            dst.symlink_to(os.readlink(so))
        else:
            shutil.copy2(so, dst)
    for h in [*(tree / "ggml" / "include").glob("*.h"), *(tree / "include").glob("*.h")]:
        shutil.copy2(h, prefix / "include" / h.name)
    src = prefix / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    shutil.copy2(tree / "convert_hf_to_gguf.py", src)
    shutil.copy2(tree / "LICENSE", src)
    shutil.copytree(tree / "conversion", src / "conversion")
    shutil.copytree(tree / "gguf-py", src / "gguf-py")
    if (tree / "models" / "templates").is_dir():
        shutil.copytree(tree / "models" / "templates", src / "models" / "templates")
    (prefix / "env.sh").write_text(
        f'export LLAMA_CPP_REF="{prefix}"\nexport PATH="{prefix}/bin:${{PATH:-}}"\n'
        f'export LD_LIBRARY_PATH="{prefix}/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n')
    (prefix / "VERSION").write_text(f"llama-cpp-python {PINNED_LLAMA_CPP_PYTHON}\nllama.cpp commit {PINNED_LLAMA_CPP_COMMIT}\n")
    print(f"reference llama.cpp built: {prefix}", file=sys.stderr)
    return prefix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", type=Path, default=Path(os.environ.get("LLAMA_CPP_REF") or DEFAULT_PREFIX))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        build(args.prefix, args.jobs, args.force)
    except ProvisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
