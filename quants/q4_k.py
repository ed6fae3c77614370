"""Q4_K: 256-weight super-blocks of 8 x 32 4-bit levels with 6-bit scales and mins, as ggml writes them.

Without importance this is quantize_row_q4_K_ref (make_qkx2 search, max-normalised scales); with it,
quantize_row_q4_K_impl (importance-weighted make_qkx3 search, make_qp_quants for the scales).
The levels come from affine_search.k4_levels (numpy, the reference) or its compiled twin in affine_numba.
"""

from __future__ import annotations

import numpy as np

from quants import affine_numba
from quants.affine_search import fp16_bytes, k4_levels, quantize_superblocks

QK_K = 256
BLOCK_BYTES = 144  # d (f16), dmin (f16), scales[12], qs[128]


def quantize_q4_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 256 * 144), ggml_quantize_chunk's bytes."""
    return quantize_superblocks(rows, importance, BLOCK_BYTES, _fill)


def _fill(x: np.ndarray, qw: np.ndarray | None, o: np.ndarray) -> None:
    levels = affine_numba.k4_levels if affine_numba.USE_NUMBA else k4_levels
    d, dmin, sc, L = levels(x, qw, 15, (-1.0, 0.1, 20), clamp_qp_levels=False)
    o[:, 0:2] = fp16_bytes(d)
    o[:, 2:4] = fp16_bytes(dmin)
    o[:, 4:16] = sc
    Lb = L.reshape(-1, 4, 2, 32)
    o[:, 16:144] = (Lb[:, :, 0, :] | (Lb[:, :, 1, :] << 4)).reshape(-1, 128)
