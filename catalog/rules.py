"""llama-quantize's per-tensor rules, restated: which tensors may be quantized, and the shape fallbacks.

Why here: the catalog reports `quantizable` and the converter must pick exactly the type the reference
`llama-quantize --tensor-type-file` would pick, so both read these rules from one place. Written from reading
src/llama-quant.cpp (tensor_allows_quantization, tensor_type_fallback) at the pinned llama.cpp commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType

# Substrings that keep a 2-D/3-D "*weight" tensor unquantized in llama-quantize (small or numerically delicate).
_NEVER_QUANTIZED_PARTS: tuple[str, ...] = (
    "_norm.weight",                   # norms
    "ffn_gate_inp.weight",            # MoE router
    "ffn_gate_tid2eid.weight",        # DeepSeek-V4 routing table
    "altup", "laurel",                # Gemma-3n tiny matrices
    "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight",
    "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES: frozenset[str] = frozenset({"position_embd.weight", "token_types.weight"})
# extra exclusions llama-quantize applies only to the GLM5-next architecture
_GLM5_NEXT_PARTS: tuple[str, ...] = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)


def allows_quantization(name: str, n_dims: int, arch: str | None = None) -> bool:
    """Would llama-quantize quantize this tensor (default options: output.weight included)?"""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES or any(p in name for p in _NEVER_QUANTIZED_PARTS):
        return False
    if arch is not None and arch.replace("_", "-").lower() in ("glm5-next", "glm5next"):
        if any(p in name for p in _GLM5_NEXT_PARTS):
            return False
    return True


# target type -> the type llama-quantize uses when the row length is not a multiple of the target's block size.
# 32-block types have no smaller block to fall to; they (and a fallback that still does not fit) become F16.
FALLBACKS: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


class NoFallback(ValueError):
    """llama-quantize aborts for this (type, shape) pair too."""


@dataclass(frozen=True)
class TypeChoice:
    requested: GGMLQuantizationType
    final: GGMLQuantizationType

    @property
    def fell_back(self) -> bool:
        return self.requested != self.final


def fallback_type(qtype: GGMLQuantizationType, n_per_row: int) -> TypeChoice:
    """The type llama-quantize writes when asked for `qtype` on rows of `n_per_row` values."""
    bs = GGML_QUANT_SIZES[qtype][0]
    if n_per_row % bs == 0:
        return TypeChoice(qtype, qtype)
    if qtype in FALLBACKS:
        fb = FALLBACKS[qtype]
    elif bs <= 32:
        fb = qtype
    else:
        raise NoFallback(f"no fallback is defined for type {qtype.name} (rows of {n_per_row})")
    if n_per_row % GGML_QUANT_SIZES[fb][0] != 0:
        fb = T.F16
    return TypeChoice(qtype, fb)


_BLK = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def tensor_class(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'blk.3.attn_q.bias' -> 'attn_q.bias'; 'token_embd.weight' -> 'token_embd'.

    The class groups tensors the way strategies and reports talk about them (one per role, all layers).
    """
    base = _BLK.sub("", name)
    if base.endswith(".weight"):
        return base[: -len(".weight")]
    return base
