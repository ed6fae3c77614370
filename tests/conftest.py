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
