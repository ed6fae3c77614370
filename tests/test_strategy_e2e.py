"""End to end on a real (tiny) checkpoint: catalog tensors, round-trip errors from `quants`, a budget plan,
the converter writes it, and the file is exactly the size the plan predicted and within the budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def measure_tiny(model_dir: Path):
    """Round-trip every quantizable tensor through each type (plain MSE: no imatrix in this test)."""
    import catalog
    import quants
    from measure.records import Measurement
    from strategy.sizes import bits_per_weight, fits_row, tensor_data_bytes

    out = []
    for info, data in catalog.iter_tensors(model_dir):
        if not info.quantizable:
            continue
        rows = data.reshape(-1, data.shape[-1])
        for t in TYPES:
            if not fits_row(t, rows.shape[-1]):
                continue
            back = quants.dequantize(quants.quantize(rows, t), t).reshape(rows.shape)
            err = back - rows
            mse = float(np.mean(err * err))
            norm = float(np.sqrt(np.sum(rows * rows)))
            out.append(Measurement(info.name, t, info.n_params, tensor_data_bytes(t, info.shape), bits_per_weight(t),
                                   mse ** 0.5, float(np.abs(err).max()), mse, float(np.sqrt(np.sum(err * err))) / norm,
                                   float(np.sum(back * rows) / (np.linalg.norm(back) * norm)), info.cls, info.layer))
    return out


@pytest.mark.slow
def test_budget_plan_converts_to_exactly_the_predicted_size(tiny_model, tmp_path):
    import gguf

    from strategy.build import build, load_metas
    from strategy.plan import save_plan
    from strategy.sizes import metadata_bytes_from_gguf

    model = tiny_model("llama")
    metas = load_metas(model)
    meas = measure_tiny(model)
    # kv bytes from a first conversion (all Q8_0): the kv section does not depend on the tensor types
    first = tmp_path / "q8.gguf"
    subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf_strategy.py"), str(model), "--outtype", "q8_0",
                    "--outfile", str(first)], check=True, capture_output=True, cwd=ROOT)
    kv = metadata_bytes_from_gguf(first)
    from strategy.problem import build_candidates

    c = build_candidates(meas, metas, metadata_bytes=kv)
    target = (c.min_bytes() + c.max_bytes()) // 2
    res = build(meas, metas, method="budget", target_size=target, metadata_bytes=kv, plan_file_name="plan.yaml")
    assert res.size <= target
    plan_path = tmp_path / "plan.yaml"
    save_plan(res.plan, plan_path)
    out = tmp_path / "mixed.gguf"
    p = subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf_strategy.py"), str(model), "--strategy",
                        str(plan_path), "--outfile", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.stat().st_size == res.size
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    for name, choice in res.plan.tensors.items():
        assert written[name] == choice.type
    assert len(set(written.values())) >= 3  # a real mix, not one type
