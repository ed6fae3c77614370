"""Q2_K: 256-weight super-blocks of 16 x 16 2-bit levels with 4-bit scales and mins, as ggml writes them.

Without importance this is quantize_row_q2_K_ref (make_qkx2 search with absolute-error metric,
max-normalised scales); with it, quantize_row_q2_K_impl (weighted make_qkx3 + make_qp_quants).
"""

from __future__ import annotations

import numpy as np

from quants.affine_search import (
    F32,
    fp16_bytes,
    fp16_round,
    k_superblock_stats,
    make_qkx,
    make_qp,
    nearest_int,
    positive_max,
    quantize_superblocks,
    requantize,
    seq_sum,
    subblocks,
)

QK_K = 256
BLOCK_BYTES = 84  # scales[16], qs[64], d (f16), dmin (f16)


def _levels(xb: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin fp16-rounded (nB,), scales (nB, 16) uint8, L (nB, 256) uint8)."""
    nB = xb.shape[0]
    xs = subblocks(xb, 16)
    if qw is None:
        scale, the_min, L = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins = scale.reshape(nB, 16), the_min.reshape(nB, 16)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(divide="ignore"):
            isc = np.where(max_scale > 0, F32(15.0) / max_scale, F32(0.0)).astype(F32)
            imn = np.where(max_min > 0, F32(15.0) / max_min, F32(0.0)).astype(F32)
        lsc = np.where(max_scale[:, None] > 0, nearest_int(isc[:, None] * scales), 0) & 0xFF
        lmn = np.where(max_min[:, None] > 0, nearest_int(imn[:, None] * mins) << 4, 0) & 0xFF
        sc = (lsc | lmn).astype(np.uint8)
        d = fp16_round(np.where(max_scale > 0, max_scale / F32(15.0), F32(0.0)))
        dmin = fp16_round(np.where(max_min > 0, max_min / F32(15.0), F32(0.0)))
    else:
        sigma2 = k_superblock_stats(xb) / F32(256)
        w = subblocks(qw, 16) * np.sqrt(np.repeat(sigma2, 16) + xs * xs)
        sw = seq_sum(w)
        scale, the_min, L = make_qkx(xs, w, 3, -0.9, 0.05, 36, False)
        sw16 = np.ascontiguousarray(sw.reshape(nB, 16).T)
        dm, ls = make_qp(np.ascontiguousarray(scale.reshape(nB, 16).T), sw16, 15)
        mm, lm = make_qp(np.ascontiguousarray(the_min.reshape(nB, 16).T), sw16, 15)
        d, dmin = fp16_round(dm), fp16_round(mm)
        sc = np.ascontiguousarray((ls | (lm << 4)).T).astype(np.uint8)
    dd = (d[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    dm_ = (dmin[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    L = requantize(xs, dd, dm_, L, 3)
    return d, dmin, sc, np.ascontiguousarray(L.T).reshape(nB, 256)


def quantize_q2_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 256 * 84), ggml_quantize_chunk's bytes."""
    return quantize_superblocks(rows, importance, BLOCK_BYTES, _fill)


_SHIFTS = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]


def _fill(x: np.ndarray, qw: np.ndarray | None, o: np.ndarray) -> None:
    d, dmin, sc, L = _levels(x, qw)
    o[:, 0:16] = sc
    Lb = L.reshape(-1, 2, 4, 32)  # [block, half of 128, shift group, element]
    o[:, 16:80] = np.bitwise_or.reduce(Lb << _SHIFTS, axis=2).reshape(-1, 64)
    o[:, 80:82] = fp16_bytes(d)
    o[:, 82:84] = fp16_bytes(dmin)
