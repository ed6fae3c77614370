"""Q6_K: 256-weight super-blocks, 16 sub-blocks of 16 with int8 scales, 6-bit levels (ggml bit for bit).

ggml's reference path (no imatrix) and its imatrix path differ only in the weights of the per-sub-block
search (x*x versus the importance vector), so one routine serves both.
Block layout (210 bytes): ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8, d fp16.
"""

from __future__ import annotations

import numpy as np

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
    n_rows, n_per_row = rows.shape
    xb = rows.reshape(-1, QK_K)
    out = np.empty((xb.shape[0], BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ggml's inf/NaN paths, mirrored
        for units in chunks(xb.shape[0], QK_K):
            qw = None if importance is None else unit_importance(importance, QK_K, units)
            out[units] = _quantize_blocks(xb[units], qw)
    return out.reshape(n_rows, -1)


def _quantize_blocks(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    nb = xb.shape[0]
    x = blocks_T(xb, 16)  # (16, nb*16)
    w = x * x if qw is None else blocks_T(qw, 16)
    scales, L = make_qx_quants(x, 32, w)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = first_absmax(scales.T)
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128.0) / np.where(zero, F32(1.0), max_scale)
    d_store = F32(1.0) / iscale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = (fp16_round(d_store)[:, None] * sc.astype(F32)).reshape(-1)  # (nb*16,)
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
