"""Shared fixtures: the reference llama.cpp build and tiny generated checkpoints."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import CALIBRATION_TEXT, EVALUATION_TEXT, make_tiny_model  # noqa: E402

SHARED_MAKE_REAL_MODEL = ROOT.parent / "shared" / "tools" / "make_real_model.py"
SMOLLM2_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "real-models" / "smollm2-bf16"


def pytest_configure(config):
    """Real-weight tests read SMOLLM2_DIR. In a development checkout (with ../shared) make it once and cache it;
    a user's clone has no ../shared and those tests skip."""
    if os.environ.get("SMOLLM2_DIR") or not SHARED_MAKE_REAL_MODEL.is_file():
        return
    if not (SMOLLM2_CACHE / "config.json").is_file():
        import subprocess

        res = subprocess.run([sys.executable, str(SHARED_MAKE_REAL_MODEL), "--smollm2", "--out", str(SMOLLM2_CACHE)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            msg = (res.stderr.strip().splitlines() or ["?"])[-1]
            if os.environ.get("CI"):
                raise pytest.UsageError(f"could not make the SmolLM2 checkpoint for real-weight tests: {msg}")
            print(f"warning: real-weight tests will skip, SmolLM2 checkpoint not made: {msg}", file=sys.stderr)
            return
    os.environ["SMOLLM2_DIR"] = str(SMOLLM2_CACHE)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M checkpoint (BF16, dithered), or skip."""
    d = os.environ.get("SMOLLM2_DIR")
    if not d or not (Path(d) / "config.json").is_file():
        pytest.skip("SMOLLM2_DIR not set (needs ../shared/tools/make_real_model.py in a development checkout)")
    return Path(d)


@pytest.fixture(scope="session")
def reference():
    """The reference llama.cpp build. In CI (CI=true) a missing build fails instead of skipping."""
    from llamacpp.reference import ReferenceNotFound, find_reference

    try:
        return find_reference()
    except ReferenceNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"reference llama.cpp build missing in CI: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """tiny_model('llama') -> path of a generated checkpoint; cached per (arch, options) for the session."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(arch, out, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def calibration_text() -> Path:
    return CALIBRATION_TEXT


@pytest.fixture(scope="session")
def evaluation_text() -> Path:
    return EVALUATION_TEXT
