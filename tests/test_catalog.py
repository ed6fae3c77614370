"""catalog: names, shapes and float32 data must equal what llama.cpp's own converter writes with --outtype f32."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import catalog
from catalog.rules import allows_quantization, fallback_type, tensor_class


def upstream_f32(model_dir: Path, out: Path) -> Path:
    """Run llama.cpp's stock convert_hf_to_gguf.py (the pinned sources) to an F32 GGUF."""
    from llamacpp.upstream import find_sources

    src = find_sources()
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                    "--outfile", str(out)], check=True, capture_output=True)
    return out


def read_gguf(path: Path) -> dict[str, tuple[int, np.ndarray, tuple[int, ...]]]:
    from catalog.hook import activate

    activate()
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.array(t.data), tuple(int(x) for x in t.shape)) for t in r.tensors}


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gemma", "qwen2"])
def test_catalog_matches_upstream_f32_conversion(tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    ref = read_gguf(upstream_f32(model, tmp_path / "ref.gguf"))
    infos = catalog.list_tensors(model)
    assert [i.name for i in infos] != []
    assert sorted(i.name for i in infos) == sorted(ref)
    seen = 0
    for info, data in catalog.iter_tensors(model):
        qt, ref_data, ne = ref[info.name]
        assert info.ne == ne, info.name
        assert data.dtype == np.float32 and data.shape == info.shape
        assert np.array_equal(data.reshape(-1), ref_data.reshape(-1).astype(np.float32)), info.name
        assert info.n_params == data.size
        seen += 1
    assert seen == len(infos)


def test_catalog_classes_and_quantizable(tiny_model):
    infos = {i.name: i for i in catalog.list_tensors(tiny_model("mixtral"))}
    assert infos["blk.1.ffn_down_exps.weight"].cls == "ffn_down_exps"
    assert infos["blk.1.ffn_down_exps.weight"].layer == 1
    assert infos["blk.1.ffn_down_exps.weight"].n_expert == 4
    assert infos["blk.0.ffn_gate_inp.weight"].quantizable is False  # MoE router stays F32
    assert infos["blk.0.attn_norm.weight"].quantizable is False
    assert infos["blk.0.attn_norm.weight"].fixed_type == "F32"
    assert infos["token_embd.weight"].layer is None and infos["token_embd.weight"].quantizable
    assert infos["blk.0.attn_q.weight"].quantizable and infos["blk.0.attn_q.weight"].fixed_type is None


def test_iter_tensors_subset(tiny_model):
    got = [i.name for i, _ in catalog.iter_tensors(tiny_model("llama"), names={"blk.0.attn_k.weight"})]
    assert got == ["blk.0.attn_k.weight"]


def test_rules():
    from gguf import GGMLQuantizationType as T

    assert not allows_quantization("blk.0.attn_norm.weight", 2)
    assert not allows_quantization("blk.0.attn_q.bias", 2)
    assert not allows_quantization("blk.0.attn_q.weight", 1)
    assert allows_quantization("output.weight", 2)
    assert fallback_type(T.Q4_K, 320).final == T.Q5_0
    assert fallback_type(T.Q6_K, 320).final == T.Q8_0
    assert fallback_type(T.Q5_K, 256).final == T.Q5_K
    assert fallback_type(T.IQ4_XS, 96).final == T.IQ4_NL
    assert fallback_type(T.Q4_K, 100).final == T.F16  # Q5_0 does not fit either
    assert fallback_type(T.Q8_0, 100).final == T.F16
    assert tensor_class("blk.12.attn_q.bias") == "attn_q.bias"


def test_not_a_model_dir(tmp_path):
    with pytest.raises(catalog.ModelInputError, match="not a model directory"):
        catalog.list_tensors(tmp_path)
