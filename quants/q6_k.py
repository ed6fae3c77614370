"""Q6_K: 256-weight super-blocks, 16 sub-blocks of 16 with int8 scales, 6-bit levels (ggml bit for bit).

ggml's reference path (no imatrix) and its imatrix path differ only in the weights of the per-sub-block
search (x*x versus the importance vector), so one routine serves both.  The search and the packing have an
optional numba fast path (symmetric_numba); the numpy path is the reference.
Block layout (210 bytes): ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8, d fp16.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_numba
from quants.symmetric_search import (
    F32,
    GROUP_MAX_EPS,
    blocks_T,
    chunks,
    first_absmax,
    fp16_bits,
    fp16_round,
    make_qx_quants,
    nearest_int,
    unit_importance,
)

QK_K = 256
BLOCK_BYTES = 210


def quantize_q6_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/256*210), as ggml_quantize_chunk(Q6_K)."""
    return _quantize(rows, importance, fast=USE_NUMBA)


def _quantize(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    n_rows, n_per_row = rows.shape
    xb = rows.reshape(-1, QK_K)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ggml's inf/NaN paths, mirrored
        if fast:
            out = _quantize_numba(np.ascontiguousarray(xb, dtype=F32), importance)
        else:
            out = np.empty((xb.shape[0], BLOCK_BYTES), dtype=np.uint8)
            for units in chunks(xb.shape[0], QK_K):
                qw = None if importance is None else unit_importance(importance, QK_K, units)
                out[units] = _quantize_blocks(xb[units], qw)
    return out.reshape(n_rows, n_per_row // QK_K * BLOCK_BYTES)


def _quantize_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = xb.shape[0]
    x = blocks_T(xb, 16)  # (16, nb*16)
    w = x * x if qw is None else blocks_T(qw, 16)
    scales, L = make_qx_quants(x, 32, w)
    zero, sc, d_store, d = _super_scales(scales.reshape(nb, 16))
    d = d.reshape(-1)  # (nb*16,)
    nz = d != 0
    lq = np.clip(nearest_int(x / np.where(nz, d, F32(1.0))), -32, 31) + 32
    L = np.where(nz, lq, L).astype(np.uint8)

    Ln = L.T.reshape(nb, 2, 4, 32)  # natural order: half, quarter, element
    lo = Ln & 0xF
    hi = Ln >> 4
    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    ql = out[:, :128].reshape(nb, 2, 2, 32)
    ql[:, :, 0] = lo[:, :, 0] | (lo[:, :, 2] << 4)
    ql[:, :, 1] = lo[:, :, 1] | (lo[:, :, 3] << 4)
    out[:, 128:192].reshape(nb, 2, 32)[:] = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = fp16_bits(d_store)
    if zero.any():
        out[zero] = 0
    return out


def _super_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sub-block scales (nb, 16) -> (all-zero super-block mask, int8 scales (nb, 16), fp32 super-scale d
    (stored as fp16), the dequantization scales fp16(d) * scales (nb, 16))."""
    max_abs, max_scale = first_absmax(scales.T)
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128.0) / np.where(zero, F32(1.0), max_scale)
    d_store = F32(1.0) / iscale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = fp16_round(d_store)[:, None] * sc.astype(F32)
    return zero, sc, d_store, d


def _quantize_numba(xb: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """_quantize_blocks over all super-blocks xb (nb, 256) with the compiled search and packing."""
    nb = xb.shape[0]
    scales = np.empty((nb, 16), dtype=F32)
    L = np.empty((nb, QK_K), dtype=np.uint8)
    imp = np.ones(1, dtype=F32) if importance is None else np.ascontiguousarray(importance, dtype=F32)
    symmetric_numba.q6k_levels(xb, imp, importance is not None, scales, L)
    zero, sc, d_store, d = _super_scales(scales)
    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    symmetric_numba.q6k_pack(xb, L, d, out)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = fp16_bits(d_store)
    if zero.any():
        out[zero] = 0
    return out


# Compiled at import (or loaded from numba's cache) and checked against the numpy path; numpy on any failure.
USE_NUMBA = symmetric_numba.self_check(_quantize, 512)
