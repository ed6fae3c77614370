"""Q4_1: 32-weight blocks with fp16 scale and offset and 4-bit levels, as ggml writes them.

With importance this is quantize_row_q4_1_impl (importance-weighted make_qkx3 search); without,
quantize_row_q4_1_ref (gguf-py has it too, but gets the sign of a zero offset wrong: it writes
m = +0.0 where ggml writes -0.0 for blocks whose first zero is -0.0).  Both paths have compiled twins in
affine_numba, used when affine_numba.USE_NUMBA is set (the numpy ones in affine_search are the reference).
"""

from __future__ import annotations

import numpy as np

from quants import affine_numba
from quants.affine_search import quantize_legacy_affine

QK = 32
BLOCK_BYTES = 20  # d (f16), m (f16), qs[16]


def quantize_q4_1(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 32 * 20), ggml_quantize_chunk's bytes."""
    fast = affine_numba.USE_NUMBA
    return quantize_legacy_affine(rows, importance, 15, BLOCK_BYTES, _pack,
                                  affine_numba.legacy_affine_levels if fast else None,
                                  affine_numba.legacy_affine_ref if fast else None)


def _pack(L: np.ndarray, o: np.ndarray) -> None:
    o[:, 4:20] = L[:, :16] | (L[:, 16:] << 4)
