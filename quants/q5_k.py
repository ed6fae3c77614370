"""Q5_K: 256-weight super-blocks of 8 x 32 5-bit levels with 6-bit scales and mins, as ggml writes them.

Without importance this is quantize_row_q5_K_ref (make_qkx2 search); with it, quantize_row_q5_K_impl
(importance-weighted make_qkx3 search, make_qp_quants for the scales).
The levels come from affine_search.k4_levels (numpy, the reference) or its compiled twin in affine_numba.
"""

from __future__ import annotations

import numpy as np

from quants import affine_numba
from quants.affine_search import fp16_bytes, k4_levels, quantize_superblocks

QK_K = 256
BLOCK_BYTES = 176  # d (f16), dmin (f16), scales[12], qh[32], qs[128]


def quantize_q5_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 256 * 176), ggml_quantize_chunk's bytes."""
    return quantize_superblocks(rows, importance, BLOCK_BYTES, _fill)


_SHIFTS = (2 * np.arange(4, dtype=np.uint8))[None, :, None]


def _fill(x: np.ndarray, qw: np.ndarray | None, o: np.ndarray) -> None:
    levels = affine_numba.k4_levels if affine_numba.USE_NUMBA else k4_levels
    d, dmin, sc, L = levels(x, qw, 31, (-0.5, 0.1, 15), clamp_qp_levels=True)
    o[:, 0:2] = fp16_bytes(d)
    o[:, 2:4] = fp16_bytes(dmin)
    o[:, 4:16] = sc
    Lb = L.reshape(-1, 4, 2, 32)  # [block, pair of sub-blocks, low/high nibble, element]
    hi = Lb >> 4
    o[:, 16:48] = np.bitwise_or.reduce((hi[:, :, 0, :] << _SHIFTS) | (hi[:, :, 1, :] << (_SHIFTS + 1)), axis=1)
    lo = Lb & 0xF
    o[:, 48:176] = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(-1, 128)
