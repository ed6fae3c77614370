"""Error-compensated encoding (GPTQ): the same GGUF blocks ggml decodes, their codes chosen to cancel output error.

ggml rounds each weight on its own, weighting weights by the imatrix (the diagonal of the input covariance H).
A matmul's output error is E H E^T, so one weight's rounding error can be cancelled by nudging the weights not
yet quantized, through the off-diagonal of H (GPTQ, Frantar et al. 2022). We walk a row's blocks in order. At
the start of block b, the project's own ggml quantizer encodes the (already nudged) block, which fixes the
block's scale bytes exactly as ggml would write them. Then the walk goes weight by weight through the block:
each weight takes the nearest level of that fixed grid (`quants.levels`; ggml's own code while nothing has
moved it), and its rounding error moves the later weights of the block by the optimal correction, e_i / U_ii
times row i of U, the upper Cholesky factor of H^-1. At the end of the block the accumulated errors move the
rest of the row the same way. Rows are independent, so any chunk of whole rows gives the same bytes.

Choosing codes inside a block, rather than compensating whole blocks as ggml rounds them (the previous
encoding), lowers the output error a little more (2-5% on SmolLM2, docs/compensation.md). The result is a different encoding from ggml's, decoded by ggml unchanged, and measured better end to end
(docs/quality.md). With a diagonal H nothing moves and the bytes equal plain quantization (tested), except for
the legacy 32-blocks (Q4_0/Q4_1/Q5_0/Q5_1) with an imatrix: ggml's search weights them with a row statistic
(mean x^2), which here comes from the block being quantized, not the whole row (weighted error differs < 0.1%).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES

import quants
from quants import levels, polish

DAMP = 0.01          # fraction of mean(diag H) added to the diagonal: H from a few thousand tokens is near-singular
ROW_CHUNK = 4096     # rows corrected at once (float64 working copy)
_NOT_COMPENSATED = ("F32", "F16", "BF16")

_factor_cache: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()


def _factor_rows(hessian: np.ndarray, bs: int, damp: float) -> list[np.ndarray]:
    """Per block column b starting at c: rows c..c+bs of U from column c on (bs, K - c); H^-1 = U^T U."""
    h = polish.damped(hessian, damp)
    k = h.shape[0]
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise quants.QuantInputError(f"input covariance ({k}x{k}) is not positive definite even after damping; "
                                     "recompute it from more calibration tokens") from None
    return [np.ascontiguousarray(u[c:c + bs, c:]) for c in range(0, k, bs)]


def _cached_factor_rows(hessian: np.ndarray, bs: int, damp: float) -> list[np.ndarray]:
    """`_factor_rows` for a shared covariance, which many tensors (and every type of one tensor) reuse."""
    h = np.ascontiguousarray(hessian, dtype=np.float64)
    key = (hashlib.sha1(h.tobytes()).hexdigest(), h.shape[0], bs, damp)
    hit = _factor_cache.get(key)
    if hit is not None:
        _factor_cache.move_to_end(key)
        return hit
    rows = _factor_cache[key] = _factor_rows(h, bs, damp)
    while len(_factor_cache) > 8:
        _factor_cache.popitem(last=False)
    return rows


def quantize_compensated(data: np.ndarray, qtype, importance: np.ndarray | None, hessian: np.ndarray, *,
                         damp: float = DAMP, name: str | None = None, cache_factor: bool = True,
                         do_polish: bool = True) -> np.ndarray:
    """Bytes of a 2-D tensor (rows, K) as `qtype`, codes chosen to cancel output error under input covariance
    `hessian` (K, K). Same shape and dtype as `quants.quantize` returns; float types are not compensated.
    `cache_factor=False` for a covariance used once (a row's own): its factor is neither hashed nor cached, so it
    does not evict the shared ones. `do_polish=False` stops after the walk (`quants.polish` refines its codes and
    scales)."""
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
        factor = (_cached_factor_rows if cache_factor else _factor_rows)(hessian, bs, damp)
    except quants.QuantInputError as e:
        raise quants.QuantInputError(f"{what}: {e}") from None
    imp = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    pieces = []
    h_polish = polish.damped(hessian, polish.DAMP) if do_polish else None
    for r0 in range(0, rows.shape[0], ROW_CHUNK):
        w = rows[r0:r0 + ROW_CHUNK].astype(np.float64)
        w0 = w.copy() if do_polish else None
        cols = []
        for bi, c in enumerate(range(0, k, bs)):
            e = c + bs
            start = np.ascontiguousarray(w[:, c:e], dtype=np.float32)
            blocks = quants.quantize(start, qtype, None if imp is None else imp[c:e], name=name)
            codes, err = _walk_block(w[:, c:e], blocks, qtype, factor[bi][:, :bs])
            cols.append(levels.pack_codes(blocks, codes, qtype))
            if e < k:
                w[:, e:] -= err @ factor[bi][:, bs:]
        out = np.concatenate(cols, axis=1)
        if do_polish:
            out = polish.polish(w0, out, qtype, h_polish)
        pieces.append(out)
    return np.concatenate(pieces, axis=0)


@dataclass(frozen=True)
class RowCovariances:
    """Some rows of a matrix with an input covariance of their own; the others share the tensor's.

    Why: a tied embedding's row v matters as a head row only where token v is probable, and as a lookup row only
    where v occurs, so one covariance for all rows spends precision on the wrong tokens (docs/quality.md). The
    matrices are built one at a time by `covariance`: thousands of K x K float64 matrices do not fit in memory."""

    rows: np.ndarray                          # row indices, int
    covariance: Callable[[int], np.ndarray]   # row index -> (K, K)


def quantize_compensated_rows(data: np.ndarray, qtype, importance: np.ndarray | None, hessian: np.ndarray,
                              row_covariances: RowCovariances, *, damp: float = DAMP,
                              name: str | None = None, do_polish: bool = True) -> np.ndarray:
    """`quantize_compensated` with the shared `hessian`, then each row of `row_covariances` re-encoded under its
    own matrix (its diagonal as the block search's importance). Rows are independent, so the bytes of the other
    rows are those of the shared encoding."""
    out = quantize_compensated(data, qtype, importance, hessian, damp=damp, name=name, do_polish=do_polish)
    if quants.parse_type(qtype).name in _NOT_COMPENSATED:
        return out
    rows = np.asarray(data, dtype=np.float32)
    for v in np.asarray(row_covariances.rows, dtype=np.int64):
        if not 0 <= v < rows.shape[0]:
            raise quants.QuantInputError(f"{f'tensor {name!r}' if name else 'tensor'}: a row covariance names row "
                                         f"{v}, the tensor has {rows.shape[0]}; is the covariance file for "
                                         f"another model?")
        hv = np.asarray(row_covariances.covariance(int(v)), dtype=np.float64)
        out[v] = quantize_compensated(rows[v:v + 1], qtype, np.diag(hv).astype(np.float32), hv, damp=damp,
                                      name=name, cache_factor=False, do_polish=do_polish)[0]
    return out


def _walk_block(x: np.ndarray, blocks: np.ndarray, qtype, u: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Codes for one block column (rows, bs), weight by weight on the grid ggml's scales fix, and the scaled
    errors e_i / U_ii that carry to the rest of the row. `x` (float64) is moved in place."""
    lay = levels.layout(qtype)
    codes = levels.unpack_codes(blocks, qtype)
    scale, offset = levels.grid(blocks, qtype)
    values = lay.table[lay.allowed]
    mids = (values[:-1] + values[1:]) / 2
    err = np.empty_like(x)
    walk = _walk_rows_compiled if USE_NUMBA else _walk_rows
    walk(x, codes, scale, offset, lay.table, lay.allowed, mids, np.ascontiguousarray(u), err)
    return codes, err


def _walk_rows(x, codes, scale, offset, table, allowed, mids, u, err) -> None:
    """The walk, vectorised over rows (the numpy reference of the compiled kernel below)."""
    start = x.copy()
    for i in range(x.shape[1]):
        xi = x[:, i]
        moved = (xi != start[:, i]) & (scale[:, i] != 0)  # unmoved weights keep ggml's own rounding
        if moved.any():
            t = (xi[moved] + offset[moved, i]) / scale[moved, i]
            codes[moved, i] = allowed[np.searchsorted(mids, t)]
        err[:, i] = (xi - (scale[:, i] * table[codes[:, i]] - offset[:, i])) / u[i, i]
        if i + 1 < x.shape[1]:
            x[:, i + 1:] -= np.outer(err[:, i], u[i, i + 1:])


def _walk_rows_kernel(x, codes, scale, offset, table, allowed, mids, u, err):  # pragma: no cover - compiled
    n, bs = x.shape
    start = np.empty(bs)
    for r in range(n):
        for i in range(bs):
            start[i] = x[r, i]
        for i in range(bs):
            xi = x[r, i]
            s = scale[r, i]
            if xi != start[i] and s != 0.0:
                codes[r, i] = allowed[np.searchsorted(mids, (xi + offset[r, i]) / s)]
            e = (xi - (s * table[codes[r, i]] - offset[r, i])) / u[i, i]
            err[r, i] = e
            for j in range(i + 1, bs):
                x[r, j] -= e * u[i, j]


def _self_check(kernel) -> bool:
    """The compiled walk gives the numpy walk's codes and errors on a small correlated case, or is not used."""
    if kernel is None:
        return False
    rng = np.random.default_rng(0)
    lay = levels.layout(quants.parse_type("Q4_0"))
    x = rng.standard_normal((6, 32))
    blocks = quants.quantize(x.astype(np.float32), "Q4_0")
    codes = levels.unpack_codes(blocks, lay.qtype)
    scale, offset = levels.grid(blocks, lay.qtype)
    m = rng.standard_normal((32, 32))
    u = np.linalg.cholesky(np.linalg.inv(m @ m.T / 32 + np.eye(32))).T
    values = lay.table[lay.allowed]
    mids = (values[:-1] + values[1:]) / 2
    outs = []
    for fn in (_walk_rows, kernel):
        xc, cc, ec = x.copy(), codes.copy(), np.empty_like(x)
        try:
            fn(xc, cc, scale, offset, lay.table, lay.allowed, mids, u, ec)
        except Exception:  # pragma: no cover
            return False
        outs.append((cc, ec))
    return bool(np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1]))


_walk_rows_compiled = quants.compiled_kernel(_walk_rows_kernel, error_model="numpy")
USE_NUMBA = _self_check(_walk_rows_compiled)
