"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear grid kvalues_iq4nl (bit for bit).

Both go through ggml's quantize_row_iq4_nl_impl with ntry = 7 (ggml_quantize_chunk never takes the
ntry = -1 reference variant); without an imatrix the search weights are x*x, with one they are
qw * sqrt(sigma2 + x*x), sigma2 = 2 * mean(x^2) over the super-block.
IQ4_NL block (18 bytes): d fp16, qs[16].  IQ4_XS super-block of 256 (136 bytes): d fp16, scales_h u16
(2 high bits per 32-block scale), scales_l[4] (low nibbles), qs[128].
Both have an optional numba fast path (symmetric_numba); the numpy path is the reference.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_numba
from quants.symmetric_search import (
    F32,
    blocks_T,
    chunks,
    first_absmax,
    fp16_bits,
    iq4_best_index,
    iq4_block_scales,
    nearest_int,
    seq_sum,
    unit_importance,
)


def quantize_iq4_nl(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/32*18), as ggml_quantize_chunk(IQ4_NL)."""
    return _quantize_nl(rows, importance, fast=USE_NUMBA)


def quantize_iq4_xs(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/256*136), as ggml_quantize_chunk(IQ4_XS)."""
    return _quantize_xs(rows, importance, fast=USE_NUMBA)


def _quantize_nl(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    if fast:
        return _quantize_numba(rows, importance, 32, 18, symmetric_numba.iq4_nl)
    return _quantize(rows, importance, 32, 18, _nl_blocks)


def _quantize_xs(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    if fast:
        return _quantize_numba(rows, importance, 256, 136, symmetric_numba.iq4_xs)
    return _quantize(rows, importance, 256, 136, _xs_blocks)


def _quantize_numba(rows, importance, super_size, block_bytes, kernel) -> np.ndarray:
    """All super-blocks at once through the compiled kernel; it leaves the fp16 scale (bytes 0-1) to us."""
    n_rows = rows.shape[0]
    xb = np.ascontiguousarray(rows, dtype=F32).reshape(-1, super_size)
    imp = np.ones(1, dtype=F32) if importance is None else np.ascontiguousarray(importance, dtype=F32)
    d = np.empty(xb.shape[0], dtype=F32)
    out = np.empty((xb.shape[0], block_bytes), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kernel(xb, imp, importance is not None, d, out)
        out[:, :2] = fp16_bits(d)
    return out.reshape(n_rows, rows.shape[1] // super_size * block_bytes)


def _quantize(rows, importance, super_size, block_bytes, fn) -> np.ndarray:
    n_rows = rows.shape[0]
    xb = rows.reshape(-1, super_size)
    out = np.empty((xb.shape[0], block_bytes), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for units in chunks(xb.shape[0], super_size):
            qw = None if importance is None else unit_importance(importance, super_size, units)
            out[units] = fn(xb[units], qw)
    return out.reshape(n_rows, rows.shape[1] // super_size * block_bytes)


def _weights(xb: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(x, w) in (32, M) block layout for super-blocks xb (nb, S)."""
    x = blocks_T(xb, 32)
    if qw is None:
        return x, x * x
    sub = xb.shape[1] // 32
    xt = np.ascontiguousarray(xb.T)
    sigma2 = seq_sum(xt * xt) * (F32(2.0) / F32(xb.shape[1]))
    return x, blocks_T(qw, 32) * np.sqrt(np.repeat(sigma2, sub)[None, :] + x * x)


def _pack_nibbles(L: np.ndarray, nb: int, per: int) -> np.ndarray:
    """L (32, M) level indices -> (nb, per*16) bytes: q[16i+j] = L[32i+j] | L[32i+16+j] << 4."""
    Ln = L.T.reshape(nb, per, 2, 16)
    return (Ln[:, :, 0] | (Ln[:, :, 1] << 4)).reshape(nb, per * 16)


def _nl_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = xb.shape[0]
    x, w = _weights(xb, qw)
    d = iq4_block_scales(x, w)
    idd = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0))
    L = iq4_best_index(x * idd)
    out = np.empty((nb, 18), dtype=np.uint8)
    out[:, :2] = fp16_bits(d)
    out[:, 2:] = _pack_nibbles(L, nb, 1)
    return out


def _xs_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = xb.shape[0]
    x, w = _weights(xb, qw)
    scales = iq4_block_scales(x, w).reshape(nb, 8)
    _, max_scale = first_absmax(scales.T)
    d = -max_scale / F32(32.0)
    idd = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0))
    ls = np.clip(nearest_int(idd[:, None] * scales), -32, 31)
    dl = (d[:, None] * ls.astype(F32)).reshape(-1)
    idl = np.where(dl != 0, F32(1.0) / np.where(dl != 0, dl, F32(1.0)), F32(0.0))
    L = iq4_best_index(x * idl)
    ls = (ls + 32).astype(np.uint16)
    out = np.empty((nb, 136), dtype=np.uint8)
    out[:, :2] = fp16_bits(d)
    sh = np.zeros(nb, dtype=np.uint16)
    for ib in range(8):
        sh |= (ls[:, ib] >> 4) << (2 * ib)
    out[:, 2:4] = sh.astype("<u2").view(np.uint8).reshape(nb, 2)
    lo = (ls & 0xF).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:] = _pack_nibbles(L, nb, 8)
    return out


# Compiled at import (or loaded from numba's cache) and checked against the numpy path; numpy on any failure.
USE_NUMBA = symmetric_numba.self_check(_quantize_nl, 512) and symmetric_numba.self_check(_quantize_xs, 512)
