"""The fp16 scale fields of ggml's blocks, split from the integer codes they multiply.

Every type we tune decodes as w = d * a + m * b per block, with a and b fixed by the codes (and, for
K-quants, the 6-bit sub-block scales): d is the block's (super-block's) fp16 scale and m its fp16 minimum
(`dmin` for K-quants; absent for symmetric types). Decoding the block once with (d, m) = (1, 0) and once with
(0, 1) gives a and b exactly, with gguf-py's own dequantizer, so no per-type decoding is written here: only
where in the block the two fields sit (ggml-common.h's block structs).

For tuning the codes too, a is further split as a = s * T[code]: s the per-weight unit scale (the sub-block
scale of K-quants, 1 for the 32-block types), T the type's level table (`quants.levels`, which also packs changed
codes back into the same bytes). Codes are held as their rank among the allowed levels, so a step of one rank is
the next level up or down, also for IQ4's non-uniform table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import quants
from quants import levels
from tune import TuneError

# type -> byte offsets of (d, m) in one block; m None for symmetric types
SCALE_FIELDS: dict[str, tuple[int, int | None]] = {
    "Q4_0": (0, None), "Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "Q8_0": (0, None),
    "IQ4_NL": (0, None), "IQ4_XS": (0, None),
    "Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None),
}


def tunable(qtype: GGMLQuantizationType) -> bool:
    return qtype.name in SCALE_FIELDS


@dataclass
class BlockFields:
    """A 2-D quantized tensor as w[r, b, i] = d[r, b] * a[r, b, i] + m[r, b] * c[r, b, i]."""

    qtype: GGMLQuantizationType
    a: np.ndarray          # (rows, blocks, block_size) float32
    c: np.ndarray | None   # same, or None for symmetric types
    d: np.ndarray          # (rows, blocks) float32 (the stored fp16 values)
    m: np.ndarray | None
    rank: np.ndarray | None = None   # (rows, blocks, block_size) int16: each code's rank among the allowed levels
    s: np.ndarray | None = None      # same shape, float32 unit scale (None: 1 for every weight)

    def weights(self, d: np.ndarray | None = None, m: np.ndarray | None = None) -> np.ndarray:
        d = self.d if d is None else d
        w = self.a * d[..., None]
        if self.c is not None:
            w = w + self.c * (self.m if m is None else m)[..., None]
        return w.reshape(self.a.shape[0], -1)


def _layout(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[int, int, int, int | None]:
    if qtype.name not in SCALE_FIELDS:
        raise TuneError(f"type {qtype.name} has no tunable scale fields; tunable: {', '.join(SCALE_FIELDS)}")
    bs, bpb = GGML_QUANT_SIZES[qtype]
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % bpb:
        raise TuneError(f"{qtype.name} data must be uint8 rows of whole {bpb}-byte blocks, got {raw.shape}")
    doff, moff = SCALE_FIELDS[qtype.name]
    return bs, bpb, doff, moff


def _get(raw: np.ndarray, bpb: int, off: int) -> np.ndarray:
    blocks = raw.reshape(raw.shape[0], -1, bpb)
    return np.ascontiguousarray(blocks[:, :, off:off + 2]).view(np.float16)[..., 0].astype(np.float32)


def _put(raw: np.ndarray, bpb: int, off: int, values: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(raw.shape[0], -1, bpb).copy()
    half = np.ascontiguousarray(np.asarray(values, dtype=np.float32).astype(np.float16))
    blocks[:, :, off:off + 2] = half.view(np.uint8).reshape(blocks.shape[0], blocks.shape[1], 2)
    return blocks.reshape(raw.shape)


def levels_by_rank(qtype: GGMLQuantizationType) -> np.ndarray:
    """The level values T[c] of the codes a weight may take, in rising order (index = rank)."""
    lay = levels.layout(qtype)
    return lay.table[lay.allowed].astype(np.float32)


def split(raw: np.ndarray, qtype: GGMLQuantizationType, codes: bool = False) -> BlockFields:
    """uint8 (rows, row_bytes) -> its fields; `weights()` then equals quants.dequantize(raw) exactly.
    With `codes`, also each weight's code rank and unit scale (a = s * levels_by_rank[rank]); rank stays None for a
    tensor holding a code outside the type's allowed levels, whose codes are then not tuned."""
    bs, bpb, doff, moff = _layout(raw, qtype)
    rows = raw.shape[0]
    d = _get(raw, bpb, doff)
    one, zero = np.ones_like(d), np.zeros_like(d)
    unit_d = _put(raw, bpb, doff, one)
    c = m = None
    if moff is not None:
        m = _get(raw, bpb, moff)
        unit_d = _put(unit_d, bpb, moff, zero)
        unit_m = _put(_put(raw, bpb, doff, zero), bpb, moff, one)
        c = quants.dequantize(unit_m, qtype).reshape(rows, -1, bs).astype(np.float32)
    a = quants.dequantize(unit_d, qtype).reshape(rows, -1, bs).astype(np.float32)
    rank = s = None
    if codes:
        lay = levels.layout(qtype)
        blocks = raw.reshape(-1, bpb)
        rank_of = np.full(len(lay.table), -1, dtype=np.int16)
        rank_of[lay.allowed] = np.arange(len(lay.allowed))
        rank = rank_of[levels.unpack_codes(blocks, qtype)]
        if (rank < 0).any():  # a code ggml never writes (Q8_0's -128, from another tool): this tensor's codes stay
            rank = None
        else:
            unit = levels.grid(unit_d.reshape(-1, bpb), qtype)[0].astype(np.float32)
            rank = rank.reshape(rows, -1, bs)
            s = None if np.all(unit == 1) else unit.reshape(rows, -1, bs)
    return BlockFields(qtype, a, c, d, m, rank, s)


def with_fields(raw: np.ndarray, qtype: GGMLQuantizationType, d: np.ndarray, m: np.ndarray | None = None,
                name: str = "tensor", rank: np.ndarray | None = None) -> np.ndarray:
    """raw with its d (and m) fields replaced by fp16(d), fp16(m), and with `rank` its level codes (by rank, as
    `split(codes=True)` gives them); every other byte unchanged."""
    _, bpb, doff, moff = _layout(raw, qtype)
    if rank is not None:
        lay = levels.layout(qtype)
        r = np.asarray(rank).reshape(-1, lay.block)
        if r.min() < 0 or r.max() >= len(lay.allowed):
            raise TuneError(f"{name}: a tuned code rank is outside 0..{len(lay.allowed) - 1}")
        raw = levels.pack_codes(raw.reshape(-1, bpb), lay.allowed[r], qtype).reshape(raw.shape)
    for what, v in (("scale", d), ("minimum", m)):
        if v is not None and not np.all(np.abs(v) < 65504):
            raise TuneError(f"{name}: a tuned block {what} left fp16's range (or is NaN); tune with a smaller --lr")
    out = _put(raw, bpb, doff, d)
    if moff is not None and m is not None:
        out = _put(out, bpb, moff, m)
    return out
