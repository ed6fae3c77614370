"""Q5_0: 32-weight blocks, one fp16 scale, 5-bit levels (ggml bit for bit).

With an imatrix ggml runs quantize_row_q5_0_impl: a weighted make_qx_quants search (nmax 16) with
weights qw * sqrt(sigma2 + x*x), sigma2 = mean(x^2) over the whole row.  Without one it is the plain
reference rounding (which gguf-py also implements).  Block layout (22 bytes): d fp16, qh u32 (5th bits),
qs[16].  The imatrix search has an optional numba fast path (symmetric_numba); numpy is the reference.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_numba
from quants.symmetric_search import legacy_blocks

QK = 32


def quantize_q5_0(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/32*22), as ggml_quantize_chunk(Q5_0)."""
    return _quantize(rows, importance, fast=USE_NUMBA)


def _quantize(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    n_rows = rows.shape[0]
    if fast and importance is not None:
        return symmetric_numba.legacy_quantize(rows, importance, nmax=16).reshape(n_rows, rows.shape[1] // QK * 22)
    d_bytes, L = legacy_blocks(rows, importance, nmax=16)
    L = L.reshape(-1, QK)
    out = np.empty((L.shape[0], 22), dtype=np.uint8)
    out[:, :2] = d_bytes
    bits = (L >> 4).astype(np.uint32)  # bit j of qh is the 5th bit of level j
    qh = np.zeros(L.shape[0], dtype=np.uint32)
    for j in range(QK):
        qh |= bits[:, j] << np.uint32(j)
    out[:, 2:6] = qh.astype("<u4").view(np.uint8).reshape(-1, 4)
    Ln = (L & 0xF).reshape(-1, 2, 16)
    out[:, 6:] = Ln[:, 0] | (Ln[:, 1] << 4)
    return out.reshape(n_rows, rows.shape[1] // QK * 22)


# Compiled at import (or loaded from numba's cache) and checked against the numpy path; numpy on any failure.
USE_NUMBA = symmetric_numba.self_check(_quantize, 256, with_plain=False)
