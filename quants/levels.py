"""Where each weight's level code sits in a GGUF block, and the grid the block's scale bytes put it on.

Every quantized type we write decodes weight i of a block as  scale_i * T[code_i] - offset_i: a code of a few
bits (split over two fields in Q3_K/Q5_*/Q6_K), a level table T (consecutive integers, or IQ4's non-uniform
kvalues) and a scale and offset fixed by the block's scale bytes. Error compensation (`quants.compensate`) keeps
the scale bytes ggml chose and re-chooses codes one weight at a time, so it needs both: the grid, to round a
moved weight onto it, and the layout, to write the codes back. Layouts follow ggml-common.h; the tests check
them against gguf-py's dequantizers and against the bytes our ggml-exact quantizers write.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quants.symmetric_search import IQ4NL_VALUES

T = GGMLQuantizationType


@dataclass(frozen=True)
class Layout:
    """Bit positions of the level codes of one block type (byte offsets within the block)."""

    qtype: GGMLQuantizationType
    lo_byte: np.ndarray            # (block,) byte holding the low bits of weight i
    lo_shift: np.ndarray
    lo_bits: int
    hi_byte: np.ndarray | None     # second field (high bits), or None
    hi_shift: np.ndarray | None
    hi_bits: int
    table: np.ndarray              # level value of each code (float64, indexed by code)
    allowed: np.ndarray            # codes a weight may take, sorted by level value

    @property
    def block(self) -> int:
        return len(self.lo_byte)

    @property
    def nbytes(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


def _nibbles(base: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """ggml's nibble layout per 32 weights: weight j in the low nibble of byte j, weight j+16 in its high one."""
    j = np.arange(n)
    return base + (j // 32) * 16 + j % 16, np.where(j % 32 < 16, 0, 4)


def _spread4(base: int, n: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """K-quant layout: per 128 weights (2 bits) or 64 (4 bits), byte l holds weights l, l+32, ... at rising shifts."""
    per_byte = 8 // bits
    i = np.arange(n)
    span = 32 * per_byte
    return base + (i // span) * 32 + i % 32, bits * ((i % span) // 32)


@cache
def layout(qtype: GGMLQuantizationType) -> Layout:
    qtype = GGMLQuantizationType(qtype)
    hi_byte = hi_shift = None
    hi_bits = 0
    if qtype == T.Q8_0:
        lo_byte, lo_shift, lo_bits = 2 + np.arange(32), np.zeros(32, dtype=int), 8
        table = np.where(np.arange(256) < 128, np.arange(256), np.arange(256) - 256)
        allowed = np.argsort(table)[1:]  # not -128: ggml never writes it and SIMD dot products take |q|
        return Layout(qtype, lo_byte, lo_shift, lo_bits, None, None, 0, table.astype(np.float64), allowed)
    if qtype in (T.Q4_0, T.Q4_1, T.IQ4_NL):
        lo_byte, lo_shift = _nibbles(2 if qtype != T.Q4_1 else 4)
        lo_bits = 4
    elif qtype in (T.Q5_0, T.Q5_1):
        base = 2 if qtype == T.Q5_0 else 4
        lo_byte, lo_shift = _nibbles(base + 4)
        lo_bits = 4
        i = np.arange(32)
        hi_byte, hi_shift, hi_bits = base + i // 8, i % 8, 1
    elif qtype == T.IQ4_XS:
        lo_byte, lo_shift = _nibbles(8, 256)
        lo_bits = 4
    elif qtype == T.Q4_K:
        lo_byte, lo_shift = _spread4(16, 256, 4)
        lo_bits = 4
    elif qtype == T.Q5_K:
        lo_byte, lo_shift = _spread4(48, 256, 4)
        lo_bits = 4
        i = np.arange(256)
        hi_byte, hi_shift, hi_bits = 16 + i % 32, i // 32, 1
    elif qtype == T.Q6_K:
        i = np.arange(256)
        quarter, lane = (i % 128) // 32, i % 32
        lo_byte = 64 * (i // 128) + 32 * (quarter % 2) + lane
        lo_shift = 4 * (quarter // 2)
        lo_bits = 4
        hi_byte, hi_shift, hi_bits = 128 + 32 * (i // 128) + lane, 2 * quarter, 2
    elif qtype == T.Q3_K:
        lo_byte, lo_shift = _spread4(32, 256, 2)
        lo_bits = 2
        i = np.arange(256)
        hi_byte, hi_shift, hi_bits = i % 32, i // 32, 1
    elif qtype == T.Q2_K:
        lo_byte, lo_shift = _spread4(16, 256, 2)
        lo_bits = 2
    else:
        raise ValueError(f"no level layout for {qtype.name}")
    n_codes = 1 << (lo_bits + hi_bits)
    codes = np.arange(n_codes)
    zero_point = {T.Q4_0: 8, T.Q5_0: 16, T.Q6_K: 32, T.Q3_K: 4}.get(qtype, 0)
    table = IQ4NL_VALUES.astype(np.float64) if qtype in (T.IQ4_NL, T.IQ4_XS) else (codes - zero_point).astype(np.float64)
    return Layout(qtype, lo_byte, lo_shift, lo_bits, hi_byte, hi_shift, hi_bits, table, np.argsort(table, kind="stable"))


@dataclass(frozen=True)
class _Field:
    """One code field grouped by byte: byte[m] holds weights elems[m, :] at shifts[m, :]."""

    bytes: np.ndarray   # (m,)
    elems: np.ndarray   # (m, per_byte)
    shifts: np.ndarray  # (m, per_byte), uint8


def _group(byte: np.ndarray, shift: np.ndarray) -> _Field:
    order = np.lexsort((shift, byte))
    uniq, counts = np.unique(byte, return_counts=True)
    assert (counts == counts[0]).all(), "every byte of a field holds the same number of codes"
    k = int(counts[0])
    return _Field(uniq, order.reshape(-1, k), shift[order].reshape(-1, k).astype(np.uint8))


@cache
def _packers(qtype: GGMLQuantizationType) -> tuple[np.ndarray, _Field, _Field | None]:
    """(keep-mask of the non-code bits of each byte, the low field, the high field)."""
    lay = layout(qtype)
    keep = np.full(lay.nbytes, 0xFF, dtype=np.uint8)
    for byte, shift, bits in ((lay.lo_byte, lay.lo_shift, lay.lo_bits), (lay.hi_byte, lay.hi_shift, lay.hi_bits)):
        if byte is not None:
            for b, sh in zip(byte, shift):
                keep[b] &= ~np.uint8((((1 << bits) - 1) << sh) & 0xFF)
    hi = _group(lay.hi_byte, lay.hi_shift) if lay.hi_byte is not None else None
    return keep, _group(lay.lo_byte, lay.lo_shift), hi


def unpack_codes(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """uint8 (n, block bytes) -> int64 codes (n, weights per block)."""
    lay = layout(qtype)
    b = blocks.astype(np.int64)
    codes = (b[:, lay.lo_byte] >> lay.lo_shift) & ((1 << lay.lo_bits) - 1)
    if lay.hi_byte is not None:
        codes |= ((b[:, lay.hi_byte] >> lay.hi_shift) & ((1 << lay.hi_bits) - 1)) << lay.lo_bits
    return codes


def pack_codes(blocks: np.ndarray, codes: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Copy of `blocks` (n, block bytes) with every level code replaced by `codes` (n, weights); scales kept."""
    lay = layout(qtype)
    keep, lo, hi = _packers(lay.qtype)
    codes = np.asarray(codes).astype(np.uint8)
    out = blocks & keep
    fields = [(lo, codes & np.uint8((1 << lay.lo_bits) - 1))]
    if hi is not None:
        fields.append((hi, codes >> np.uint8(lay.lo_bits)))
    for f, vals in fields:
        acc = np.zeros((codes.shape[0], len(f.bytes)), dtype=np.uint8)
        for j in range(f.elems.shape[1]):
            acc |= vals[:, f.elems[:, j]] << f.shifts[:, j]
        out[:, f.bytes] |= acc
    return out


def grid(blocks: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """Per weight (scale, offset), float64 (n, weights): the block decodes code c as scale * table[c] - offset.

    Read off gguf-py's own dequantizer (the two extreme codes), so no scale format is decoded twice here."""
    import quants

    lay = layout(qtype)
    lo_c, hi_c = lay.allowed[0], lay.allowed[-1]
    n = blocks.shape[0]
    d_lo = quants.dequantize(pack_codes(blocks, np.full((n, lay.block), lo_c), qtype), qtype).astype(np.float64)
    d_hi = quants.dequantize(pack_codes(blocks, np.full((n, lay.block), hi_c), qtype), qtype).astype(np.float64)
    d_lo, d_hi = d_lo.reshape(n, lay.block), d_hi.reshape(n, lay.block)
    scale = (d_hi - d_lo) / (lay.table[hi_c] - lay.table[lo_c])
    return scale, scale * lay.table[lo_c] - d_lo
