"""Q2_K: 256-weight super-blocks of 16 x 16 2-bit levels with 4-bit scales and mins, as ggml writes them.

Without importance this is quantize_row_q2_K_ref (make_qkx2 search with absolute-error metric,
max-normalised scales); with it, quantize_row_q2_K_impl (weighted make_qkx3 + make_qp_quants).  The levels
come from affine_search.q2k_levels (numpy, the reference) or its compiled twin in affine_numba.
"""

from __future__ import annotations

import numpy as np

from quants import affine_numba
from quants.affine_search import fp16_bytes, q2k_levels, quantize_superblocks

QK_K = 256
BLOCK_BYTES = 84  # scales[16], qs[64], d (f16), dmin (f16)


def quantize_q2_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 256 * 84), ggml_quantize_chunk's bytes."""
    return quantize_superblocks(rows, importance, BLOCK_BYTES, _fill)


_SHIFTS = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]


def _fill(x: np.ndarray, qw: np.ndarray | None, o: np.ndarray) -> None:
    levels = affine_numba.q2k_levels if affine_numba.USE_NUMBA else q2k_levels
    d, dmin, sc, L = levels(x, qw)
    o[:, 0:16] = sc
    Lb = L.reshape(-1, 2, 4, 32)  # [block, half of 128, shift group, element]
    o[:, 16:80] = np.bitwise_or.reduce(Lb << _SHIFTS, axis=2).reshape(-1, 64)
    o[:, 80:82] = fp16_bytes(d)
    o[:, 82:84] = fp16_bytes(dmin)
