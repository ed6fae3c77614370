"""Baselines: the stock-like mix equals llama-quantize's choice tensor for tensor; ASHQ1 stays in budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from strategy.ashq1 import allocate_ashq1, depth_weight, shared_input_groups  # noqa: E402
from strategy.budget import allocate  # noqa: E402
from strategy.problem import build_candidates  # noqa: E402
from strategy.sizes import TensorMeta  # noqa: E402
from strategy.stock import more_bits, stock_types  # noqa: E402


def test_more_bits_layers():
    assert [i for i in range(16) if more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_stock_rules_on_a_synthetic_model():
    _, metas = synth_model(n_layers=16)
    t = stock_types(metas, "Q4_K_M")
    # tied embedding (no output.weight), rows of 256 fit Q6_K
    assert t["token_embd.weight"] == "Q6_K"
    assert [t[f"blk.{i}.ffn_down.weight"] for i in (0, 2, 4, 5)] == ["Q6_K", "Q4_K", "Q6_K", "Q4_K"]
    assert t["blk.1.attn_v.weight"] == "Q6_K" and t["blk.3.attn_v.weight"] == "Q4_K"
    assert t["blk.3.attn_q.weight"] == "Q4_K"
    t2 = stock_types(metas, "Q2_K")
    assert t2["blk.5.ffn_down.weight"] == "Q3_K" and t2["blk.5.attn_output.weight"] == "Q3_K"
    assert t2["blk.5.attn_v.weight"] == "Q4_K"  # n_gqa = 4 (q rows 256, k rows 64)
    # rows that do not fit 256-blocks fall back like llama-quantize (Q4_K -> Q5_0, Q6_K -> Q8_0)
    odd = [TensorMeta(m.name, (m.shape[0], 288) if m.name == "blk.3.attn_q.weight" else m.shape, m.cls, m.layer,
                      m.quantizable, m.fixed_type) for m in metas]
    assert stock_types(odd, "Q4_K_M")["blk.3.attn_q.weight"] == "Q5_0"


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q4_K_S", "Q3_K_L"])
def test_stock_matches_llama_quantize(reference, tiny_model, tmp_path_factory, mix):
    """Our restated rules pick the same type as llama-quantize for every tensor (8 layers exercise counters)."""
    import gguf

    from catalog.rules import allows_quantization, layer_of, tensor_class
    from llamacpp.upstream import find_sources

    model = tiny_model("llama", num_hidden_layers=8)
    f32 = model / "ref-f32.gguf"
    if not f32.exists():
        subprocess.run([sys.executable, str(find_sources() / "convert_hf_to_gguf.py"), str(model), "--outtype",
                        "f32", "--outfile", str(f32)], check=True, capture_output=True)
    out = tmp_path_factory.mktemp("stock") / f"{mix}.gguf"
    p = subprocess.run([str(reference.tool("llama-quantize")), str(f32), str(out), mix], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    r = gguf.GGUFReader(str(f32))
    metas = [TensorMeta(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), tensor_class(t.name),
                        layer_of(t.name), allows_quantization(t.name, len(t.shape)), "F32") for t in r.tensors]
    ref = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    ours = stock_types(metas, mix)
    assert {n: ref[n] for n in ours} == ours


def test_shared_input_groups_and_depth_weight():
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight",
             "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "token_embd.weight"]
    groups = sorted(sorted(g) for g in shared_input_groups(names))
    assert groups == [["blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight"],
                      ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]]
    assert [depth_weight(i, 12) for i in (0, 1, 6, 7, 11)] == [2.0, 1.0, 1.0, 1.5, 1.5]
    assert depth_weight(None, 12) == 1.0


@pytest.mark.parametrize("frac", [0.2, 0.5, 0.8])
def test_ashq1_in_budget_tied_and_never_better_than_budget_on_predicted_loss(frac):
    meas, metas = synth_model(n_layers=8, seed=6)
    c = build_candidates(meas, metas)
    lo, hi = c.min_bytes(), c.max_bytes()
    budget = int(lo + frac * (hi - lo))
    ch = allocate_ashq1(c, budget)
    assert c.size_of(ch) <= budget
    types = c.types_of(ch)
    for g in shared_input_groups(c.names):
        assert len({types[n] for n in g}) == 1
    # floors: attn_v never below Q4_K
    assert all(types[n] not in ("Q2_K", "Q3_K") for n in c.names if "attn_v" in n)
    # the budget allocator optimises the predicted loss, so it can only match or beat ASHQ1 on it
    ch_b, _ = allocate(c, budget)
    assert c.loss_of(ch_b) <= c.loss_of(ch) * (1 + 1e-9)
    assert np.isfinite(c.loss_of(ch))


def test_imatrix_facts_coverage_importance_and_tied_groups():
    from measure.imatrix import Imatrix, ImatrixEntry
    from strategy.build import imatrix_facts

    _, metas = synth_model(n_layers=2, seed=1)
    rng = np.random.default_rng(0)
    entries = {}
    for layer in range(2):
        x = rng.random(256).astype(np.float32)
        for n in ("attn_q", "attn_k", "attn_v"):
            entries[f"blk.{layer}.{n}.weight"] = ImatrixEntry(x[None, :] * 5, np.array([5]))
        entries[f"blk.{layer}.attn_output.weight"] = ImatrixEntry(rng.random((1, 256)).astype(np.float32), np.array([5]))
        g = rng.random(256).astype(np.float32)
        entries[f"blk.{layer}.ffn_gate.weight"] = ImatrixEntry(g[None, :], np.array([1]))
        entries[f"blk.{layer}.ffn_up.weight"] = ImatrixEntry(g[None, :], np.array([0]))  # never reached
    facts = imatrix_facts(Imatrix(entries), metas)
    assert "token_embd.weight" in facts.no_imatrix and "blk.0.ffn_down.weight" in facts.no_imatrix
    assert "blk.1.ffn_up.weight" in facts.no_imatrix and "blk.1.attn_q.weight" not in facts.no_imatrix
    assert sorted(sorted(g) for g in facts.groups) == [
        [f"blk.{i}.attn_{n}.weight" for n in ("k", "q", "v")] for i in range(2)]
    assert facts.importance["blk.0.attn_q.weight"] == pytest.approx(float(np.mean(entries["blk.0.attn_q.weight"].values())))
