"""Q4_1: 32-weight blocks with fp16 scale and offset and 4-bit levels, as ggml writes them.

With importance this is quantize_row_q4_1_impl (importance-weighted make_qkx3 search); without,
quantize_row_q4_1_ref (gguf-py has it too, but gets the sign of a zero offset wrong: it writes
m = +0.0 where ggml writes -0.0 for blocks whose first zero is -0.0).
"""

from __future__ import annotations

import numpy as np

from quants.affine_search import legacy_affine_levels, legacy_affine_ref, row_chunks

QK = 32
BLOCK_BYTES = 20  # d (f16), m (f16), qs[16]


def quantize_q4_1(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row // 32 * 20), ggml_quantize_chunk's bytes."""
    n_rows, n_per_row = rows.shape
    nb = n_per_row // QK
    out = np.empty((n_rows, nb, BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(all="ignore"):  # overflow to inf/NaN is what ggml does too (huge values)
        for sl in row_chunks(n_rows, n_per_row):
            chunk = np.ascontiguousarray(rows[sl], dtype=np.float32)
            if importance is None:
                d, m, L = legacy_affine_ref(chunk.reshape(-1, QK), 15)
            else:
                d, m, L = legacy_affine_levels(chunk, importance, 15)
            o = out[sl].reshape(-1, BLOCK_BYTES)  # a view: out is contiguous
            o[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
            o[:, 2:4] = m.astype("<f2").view(np.uint8).reshape(-1, 2)
            o[:, 4:20] = L[:, :16] | (L[:, 16:] << 4)
    return out.reshape(n_rows, nb * BLOCK_BYTES)
