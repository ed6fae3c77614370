"""Q4_0: 32-weight blocks, one fp16 scale, 4-bit levels (ggml bit for bit).

With an imatrix ggml runs quantize_row_q4_0_impl: a weighted make_qx_quants search (nmax 8) with
weights qw * sqrt(sigma2 + x*x), sigma2 = mean(x^2) over the whole row.  Without one it is the plain
reference rounding (which gguf-py also implements).  Block layout (18 bytes): d fp16, qs[16].
The imatrix search has an optional numba fast path (symmetric_numba); the numpy path is the reference.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_numba
from quants.symmetric_search import legacy_blocks

QK = 32


def quantize_q4_0(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/32*18), as ggml_quantize_chunk(Q4_0)."""
    return _quantize(rows, importance, fast=USE_NUMBA)


def _quantize(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    n_rows = rows.shape[0]
    if fast and importance is not None:
        return symmetric_numba.legacy_quantize(rows, importance, nmax=8).reshape(n_rows, rows.shape[1] // QK * 18)
    d_bytes, L = legacy_blocks(rows, importance, nmax=8)
    Ln = L.reshape(-1, 2, 16)
    out = np.empty((Ln.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d_bytes
    out[:, 2:] = Ln[:, 0] | (Ln[:, 1] << 4)
    return out.reshape(n_rows, rows.shape[1] // QK * 18)


# Compiled at import (or loaded from numba's cache) and checked against the numpy path; numpy on any failure.
USE_NUMBA = symmetric_numba.self_check(_quantize, 256, with_plain=False)
