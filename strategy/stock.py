"""Stock-like baseline: the per-tensor types llama-quantize picks for a named mix (Q4_K_M, Q3_K_M, ...).

Why: every plan must be compared with what a user gets from `llama-quantize model.gguf Q4_K_M` at the same
file size; a plan that loses to it must not become the default. These rules are restated in Python from
reading llama.cpp's src/llama-quant.cpp (llama_tensor_get_type_impl and tensor_type_fallback, pinned commit);
only the K-quant and legacy mixes are covered (the IQ mixes need types this project does not write).

Summary of the rules (non-Falcon, dense unless n_expert == 8 noted):
- output.weight, and token_embd.weight when the embedding is tied (no output.weight): Q6_K, or Q8_0 when the
  row length is not a multiple of the default type's block size (and Q8_0 stays Q8_0).
- attn_v (and attn_qkv / attn_kv_b): Q2_K -> Q4_K if GQA >= 4 else Q3_K; Q3_K_M -> Q5_K for the first two,
  then Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K on "more bits" layers; Q4_K_S -> Q5_K for the first four.
  8 experts: Q8_0 (attn_k too).
- ffn_down: Q2_K -> Q3_K; Q3_K_M -> Q5_K below n/16 else Q4_K; Q3_K_L -> Q5_K; Q4_K_M/Q5_K_M -> Q6_K on "more
  bits" layers; Q4_K_S -> Q5_K below n/8; Q4_0/Q5_0 with an imatrix -> Q4_1/Q5_1 below n/8.
- attn_output: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K (8 experts: Q5_K for most mixes).
- attn_qkv counts as attn_v-like (upstream's separate attn_qkv branch comes after and is never reached).
- "more bits" layers: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2.
Then the shape fallback (Q4_K -> Q5_0 etc. when blocks do not divide the rows) applies.
"""

from __future__ import annotations

from collections.abc import Sequence

from gguf import GGMLQuantizationType

from strategy.sizes import TensorMeta

MIX_DEFAULT = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1",
}
MIXES = tuple(MIX_DEFAULT)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                      ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                      ("ffn_down", "ffn_down")):
        if part in name:
            return cat
    return "other"


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block(t: str) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def stock_types(metas: Sequence[TensorMeta], mix: str, *, n_gqa: int | None = None, n_expert: int = 0,
                n_layers: int | None = None, has_imatrix: bool = True) -> dict[str, str]:
    """Type per quantizable tensor that llama-quantize would choose for `mix` (after shape fallbacks)."""
    from catalog.rules import fallback_type

    mix = mix.upper()
    if mix not in MIX_DEFAULT:
        raise ValueError(f"unknown stock mix {mix!r}; choose one of {', '.join(MIXES)}")
    default = MIX_DEFAULT[mix]
    names = [m.name for m in metas]
    tied = "output.weight" not in names
    layers = [m.layer for m in metas if m.layer is not None]
    n_layer = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)
    if n_gqa is None:
        n_gqa = _guess_gqa(metas)
    n_wv = sum(1 for m in metas if m.quantizable and _category(m.name) == "attn_v")
    i_wv = 0
    i_down = 0
    out: dict[str, str] = {}
    # llama-quantize visits tensors ordered by (layer, name), non-block tensors (layer -1) first; the attn_v
    # and ffn_down counters follow that order, not the file's
    for m in sorted(metas, key=_visit_key):
        if not m.quantizable:
            continue
        cat = _category(m.name)
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            if m.n_per_row % _block(default) != 0:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif cat == "token_embd":
            pass
        elif cat == "attn_v":  # attn_v, attn_qkv, attn_kv_b ("attn_v-like" comes first upstream)
            t = _attn_v(mix, t, i_wv, n_wv, n_gqa, n_expert)
            i_wv += 1
        elif cat == "attn_k":
            if n_expert == 8:
                t = "Q8_0"
        elif cat == "ffn_down":
            i = m.layer if (n_expert > 1 and m.layer is not None) else i_down
            t = _ffn_down(mix, t, i, n_layer, has_imatrix)
            i_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    t = "Q5_K"
            else:
                t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, t)
        t_final = fallback_type(GGMLQuantizationType[t], m.n_per_row).final.name
        out[m.name] = t_final
    return out


def _visit_key(m: TensorMeta) -> tuple[int, str]:
    import re

    hit = re.match(r"blk\.(\d+)\.", m.name)
    return (int(hit.group(1)) if hit else -1, m.name)


def _attn_v(mix: str, t: str, i: int, n: int, n_gqa: int, n_expert: int) -> str:
    if mix == "Q2_K":
        t = "Q4_K" if n_gqa >= 4 else "Q3_K"
    elif mix == "Q3_K_M":
        t = "Q5_K" if i < 2 else "Q4_K"
    elif mix == "Q3_K_L":
        t = "Q5_K"
    elif mix in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
        t = "Q6_K"
    elif mix == "Q4_K_S" and i < 4:
        t = "Q5_K"
    if n_expert == 8:
        t = "Q8_0"
    return t


def _ffn_down(mix: str, t: str, i: int, n: int, has_imatrix: bool) -> str:
    if mix == "Q2_K":
        return "Q3_K"
    if mix == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if mix == "Q3_K_L":
        return "Q5_K"
    if mix == "Q4_K_M":
        return "Q6_K" if more_bits(i, n) else t
    if mix == "Q5_K_M":
        return "Q6_K" if more_bits(i, n) else t
    if mix == "Q4_K_S":
        return "Q5_K" if i < n // 8 else t
    if mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        return "Q4_1" if mix == "Q4_0" else "Q5_1"
    return t


def _guess_gqa(metas: Sequence[TensorMeta]) -> int:
    """n_head / n_head_kv from attn_q / attn_k row counts (equal head sizes assumed); 1 when unknown."""
    q = next((m for m in metas if m.name.endswith("attn_q.weight")), None)
    k = next((m for m in metas if m.name.endswith("attn_k.weight")), None)
    if q is None or k is None or len(q.shape) < 2 or len(k.shape) < 2 or k.shape[-2] == 0:
        return 1
    return max(1, q.shape[-2] // k.shape[-2])
