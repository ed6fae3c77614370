"""Synthetic measurement sets for strategy tests: error curves like real quantizers, known shapes."""

from __future__ import annotations

import numpy as np

from measure.records import Measurement
from strategy.sizes import TensorMeta, bits_per_weight, tensor_data_bytes

TYPES = ["Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"]


def synth_model(n_layers: int = 4, hidden: int = 256, ffn: int = 512, vocab: int = 512, seed: int = 0,
                types: list[str] | None = None, noise: float = 0.3) -> tuple[list[Measurement], list[TensorMeta]]:
    """A llama-like tensor list with measurements: wmse ~ sens * 2^(-2 bpw) * noise, per tensor sensitivity."""
    rng = np.random.default_rng(seed)
    types = types or TYPES
    metas: list[TensorMeta] = [TensorMeta("token_embd.weight", (vocab, hidden), "token_embd", None)]
    for li in range(n_layers):
        p = f"blk.{li}."
        metas += [
            TensorMeta(p + "attn_norm.weight", (hidden,), "attn_norm", li, False, "F32"),
            TensorMeta(p + "attn_q.weight", (hidden, hidden), "attn_q", li),
            TensorMeta(p + "attn_k.weight", (hidden // 4, hidden), "attn_k", li),
            TensorMeta(p + "attn_v.weight", (hidden // 4, hidden), "attn_v", li),
            TensorMeta(p + "attn_output.weight", (hidden, hidden), "attn_output", li),
            TensorMeta(p + "ffn_norm.weight", (hidden,), "ffn_norm", li, False, "F32"),
            TensorMeta(p + "ffn_gate.weight", (ffn, hidden), "ffn_gate", li),
            TensorMeta(p + "ffn_up.weight", (ffn, hidden), "ffn_up", li),
            TensorMeta(p + "ffn_down.weight", (hidden, ffn), "ffn_down", li),
        ]
    metas.append(TensorMeta("output_norm.weight", (hidden,), "output_norm", None, False, "F32"))
    meas = []
    for m in metas:
        if not m.quantizable:
            continue
        sens = float(rng.lognormal(0, 1.0))
        for t in types:
            b = bits_per_weight(t)
            w = sens * 2.0 ** (-2 * b) * float(rng.lognormal(0, noise)) if t != "F16" else sens * 1e-9
            meas.append(Measurement(m.name, t, m.n_params, tensor_data_bytes(t, m.shape), b, w ** 0.5, 3 * w ** 0.5,
                                    w, w ** 0.5, 1 - w, m.cls, m.layer))
    return meas, metas
