"""Error-compensated encoding (GPTQ-style): the same GGUF blocks ggml decodes, chosen to cancel output error.

ggml rounds each block on its own, weighting weights by the imatrix (the diagonal of the input covariance H).
A matmul's output error is E H E^T, so the rounding error of one block can be cancelled by nudging the weights
not yet quantized, through the off-diagonal of H (GPTQ, Frantar et al. 2022). We walk a row's blocks in order:
quantize block b with the project's own ggml quantizer (so every block is exactly what ggml writes for the
nudged weights), then move the later columns by the optimal correction, E_b U_bb^-1 U_b,rest with U the upper
Cholesky factor of H^-1. Rows are independent, so any chunk of whole rows gives the same bytes.

Within a block nothing is compensated (the block's scales must come from ggml's own search). The result is a
different encoding from ggml's, decoded by ggml unchanged, and measured better end to end (docs/quality.md).
With a diagonal H the correction is zero and the bytes equal plain quantization (tested), except for the legacy
32-blocks (Q4_0/Q4_1/Q5_0/Q5_1) with an imatrix: ggml's search weights them with a row statistic (mean x^2),
which here comes from the block column being quantized, not the whole row (the weighted error differs < 0.1%).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
from gguf import GGML_QUANT_SIZES

import quants

DAMP = 0.01          # fraction of mean(diag H) added to the diagonal: H from a few thousand tokens is near-singular
ROW_CHUNK = 4096     # rows corrected at once (float64 working copy)
_NOT_COMPENSATED = ("F32", "F16", "BF16")

_factor_cache: OrderedDict[tuple, list[np.ndarray | None]] = OrderedDict()


def _propagators(hessian: np.ndarray, bs: int, damp: float) -> list[np.ndarray | None]:
    """Per block column b: the (bs, K - end_b) matrix mapping block b's rounding error to the later columns."""
    h = np.ascontiguousarray(hessian, dtype=np.float64)
    key = (hashlib.sha1(h.tobytes()).hexdigest(), h.shape[0], bs, damp)
    hit = _factor_cache.get(key)
    if hit is not None:
        _factor_cache.move_to_end(key)
        return hit
    k = h.shape[0]
    h = h.copy()
    diag = np.diag(h).copy()
    dead = diag <= 0  # columns never activated: any value is free; keep them out of the factorisation
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    live_mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    h[np.diag_indices(k)] += damp * live_mean
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise quants.QuantInputError(f"input covariance ({k}x{k}) is not positive definite even after damping; "
                                     "recompute it from more calibration tokens") from None
    props: list[np.ndarray | None] = []
    for c in range(0, k, bs):
        e = c + bs
        props.append(np.linalg.solve(u[c:e, c:e], u[c:e, e:]) if e < k else None)
    _factor_cache[key] = props
    while len(_factor_cache) > 8:
        _factor_cache.popitem(last=False)
    return props


def quantize_compensated(data: np.ndarray, qtype, importance: np.ndarray | None, hessian: np.ndarray, *,
                         damp: float = DAMP, name: str | None = None) -> np.ndarray:
    """Bytes of a 2-D tensor (rows, K) as `qtype`, blocks chosen to cancel output error under input covariance
    `hessian` (K, K). Same shape and dtype as `quants.quantize` returns; float types are not compensated."""
    qtype = quants.parse_type(qtype)
    rows = np.asarray(data, dtype=np.float32)
    what = f"tensor {name!r}" if name else "tensor"
    if rows.ndim != 2:
        raise quants.QuantInputError(f"{what}: error compensation takes a 2-D matrix, got shape {rows.shape}")
    k = rows.shape[1]
    if np.shape(hessian) != (k, k):
        raise quants.QuantInputError(f"{what}: input covariance has shape {np.shape(hessian)}, the rows have {k} "
                                     f"columns; is the covariance file for another model?")
    if qtype.name in _NOT_COMPENSATED:
        return quants.quantize(rows, qtype, importance, name=name)
    bs = GGML_QUANT_SIZES[qtype][0]
    if k % bs:
        return quants.quantize(rows, qtype, importance, name=name)  # raises the usual one-line error
    try:
        props = _propagators(hessian, bs, damp)
    except quants.QuantInputError as e:
        raise quants.QuantInputError(f"{what}: {e}") from None
    imp = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    pieces = []
    for r0 in range(0, rows.shape[0], ROW_CHUNK):
        w = rows[r0:r0 + ROW_CHUNK].astype(np.float64)
        cols = []
        for bi, c in enumerate(range(0, k, bs)):
            e = c + bs
            block = np.ascontiguousarray(w[:, c:e], dtype=np.float32)
            q = quants.quantize(block, qtype, None if imp is None else imp[c:e], name=name)
            cols.append(q)
            if props[bi] is not None:
                err = w[:, c:e] - quants.dequantize(q, qtype).reshape(block.shape)
                w[:, e:] -= err @ props[bi]
        pieces.append(np.concatenate(cols, axis=1))
    return np.concatenate(pieces, axis=0)
