"""Provisioning of the pinned llama.cpp: converter sources, the gguf module swap, the reference build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_activate_imports_upstream_conversion_with_its_own_gguf():
    code = (
        "import gguf, sys; first = gguf.__file__\n"
        "from llamacpp.upstream import activate\n"
        "src = activate()\n"
        "import gguf, conversion\n"
        "assert gguf.__file__.startswith(str(src)), (gguf.__file__, src)\n"
        "assert hasattr(gguf, 'LazyChunkedTensor')\n"
        "from gguf import GGMLQuantizationType as T\n"
        "import numpy as np\n"
        "x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)\n"
        "import quants\n"
        "assert (gguf.quants.quantize(x, T.Q8_0) == quants.quantize(x, 'q8_0')).all()\n"
        "print(conversion.get_model_class('LlamaForCausalLM').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LlamaModel"


def test_explicit_dir_without_sources_is_a_clear_error(tmp_path):
    from llamacpp.upstream import UpstreamNotFound, find_sources

    with pytest.raises(UpstreamNotFound, match="no llama.cpp converter sources"):
        find_sources(tmp_path)


def test_sdist_extract_only_converter_sources(tmp_path):
    from llamacpp import PINNED_LLAMA_CPP_COMMIT
    from llamacpp.sdist import extract

    d = extract(tmp_path / "src", only=("conversion", "gguf-py", "convert_hf_to_gguf.py"))
    assert (d / "conversion" / "base.py").is_file()
    assert (d / "gguf-py" / "gguf" / "quants.py").is_file()
    assert not (d / "ggml").exists()
    assert (d / ".llama-commit").read_text() == PINNED_LLAMA_CPP_COMMIT


@pytest.mark.reference
def test_reference_build_is_complete(reference):
    from llamacpp.build import is_built

    assert reference.prefix is not None and is_built(reference.prefix)
    out = subprocess.run([str(reference.tool("llama-quantize")), "--help"], capture_output=True, text=True)
    assert "tensor-type-file" in out.stdout + out.stderr  # --help exits 1 by design
