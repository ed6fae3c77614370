"""Float32 search routines of ggml's symmetric (scale-only) quantizers, vectorised over blocks.

Q6_K, Q3_K, Q4_0/Q5_0 (with an imatrix) and IQ4_NL/IQ4_XS pick a per-block scale with a small search
(ggml-quants.c: make_qx_quants, make_q3_quants, the IQ4 scale scan).  To reproduce ggml's bytes every
step here is the same float32 operation, in the same order, as the C source (libggml-base is built
without FMA or fast-math); only it runs over many blocks at once.

Layout: a group of blocks is an array (n, M) -- element index first, block index second, C-contiguous.
An elementwise step is then one numpy call over all blocks, and a C accumulation `s = 0; for i: s += t[i]`
is `seq_sum`, a reduction over the outer axis, which numpy performs row after row (no pairwise
summation).  Early `break`s in the C loops become masks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: after adding it, the low mantissa bits hold round-half-even(x)

# Number of weights handled per numpy pass: big enough to amortise per-call overhead, small enough
# that the (n, M) temporaries stay in the CPU caches.
CHUNK_WEIGHTS = 1 << 18

# ggml's kvalues_iq4nl: the 16 levels of the IQ4 non-linear grid.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit trick (int32), exact for every float32 input incl. out-of-range, inf, NaN."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round half to even, overflow to inf) as little-endian byte pairs (..., 2)."""
    h = np.asarray(v, dtype=F32).astype(np.float16)
    return np.ascontiguousarray(h).view(np.uint8).reshape(*h.shape, 2)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def seq_sum(t: np.ndarray) -> np.ndarray:
    """C `float s = 0; for (i...) s += t[i];` over axis 0, in index order (including the +0 start)."""
    if t.ndim == 2 and t.shape[1] < 2:
        # with a single column numpy would reduce along the contiguous axis, pairwise
        padded = np.zeros((t.shape[0], 2), dtype=F32)
        padded[:, :1] = t
        return np.add.reduce(padded, axis=0, initial=0.0)[: t.shape[1]]
    return np.add.reduce(t, axis=0, initial=0.0)


def row_sum_sq(rows: np.ndarray) -> np.ndarray:
    """Per row `s = 0; for j: s += x[j]*x[j]` over the whole row (sequential), float32 (n_rows,)."""
    n_rows, n = rows.shape
    acc = np.zeros((1, max(n_rows, 2)), dtype=F32)
    step = 1024
    for j0 in range(0, n, step):
        blk = np.zeros((min(step, n - j0) + 1, acc.shape[1]), dtype=F32)
        blk[0] = acc[0]
        seg = rows[:, j0:j0 + step].T
        blk[1:, :n_rows] = seg * seg
        acc[0] = np.add.reduce(blk, axis=0)  # acc + t0 + t1 + ... in order
    return acc[0, :n_rows].copy()


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C `amax = max = 0; for i: if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` over axis 0.

    Returns (amax, max); NaN never wins a strict comparison, as in C.
    """
    amax = np.zeros(x.shape[1:], dtype=F32)
    mx = np.zeros(x.shape[1:], dtype=F32)
    ax = np.empty(x.shape[1:], dtype=F32)
    upd = np.empty(x.shape[1:], dtype=bool)
    for i in range(x.shape[0]):
        np.abs(x[i], out=ax)
        np.greater(ax, amax, out=upd)
        mx = np.where(upd, x[i], mx)
        np.fmax(amax, ax, out=amax)  # fmax: a NaN never replaces amax, as `ax > amax` is false for it
    return amax, mx


def blocks_T(a: np.ndarray, n: int) -> np.ndarray:
    """(..., k*n) natural layout -> (n, M) block layout, M = number of n-element blocks."""
    return np.ascontiguousarray(a.reshape(-1, n).T)


def chunks(n_units: int, unit_weights: int) -> Iterator[slice]:
    """Slices of at most ~CHUNK_WEIGHTS weights over n_units super-blocks of unit_weights each."""
    per = max(1, CHUNK_WEIGHTS // unit_weights)
    for u0 in range(0, n_units, per):
        yield slice(u0, min(n_units, u0 + per))


def unit_importance(importance: np.ndarray, unit_weights: int, units: slice) -> np.ndarray:
    """Importance rows (U, unit_weights) for the super-blocks `units` of the flattened row-major data."""
    per_row = importance.reshape(-1, unit_weights)
    pos = np.arange(units.start, units.stop) % per_row.shape[0]
    return per_row[pos]


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) for blocks x (n, M) with weights w (n, M).

    Returns (scale (M,) float32, L (n, M) uint8 in [0, 2*nmax-1]).  With no imatrix ggml's weights are
    x*x; the caller passes them.  x may hold inf/NaN (Q3_K's second-level search over scales that
    overflowed): iscale*x is NaN there, and nearest_int of that (default, arithmetic) NaN is 0.
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    nonfinite = not np.isfinite(x).all()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        safe_max = np.where(zero, F32(1.0), mx)
        wx = w * x
        tmp = np.empty_like(x)
        lf = np.empty_like(x)

        def levels(iscale: np.ndarray) -> None:
            # |iscale*x| <= nmax + 1 (or NaN), where rint is nearest_int
            np.multiply(x, iscale, out=lf)
            np.rint(lf, out=lf)
            np.clip(lf, lo, hi, out=lf)
            if nonfinite:
                lf[np.isnan(lf)] = 0.0

        def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            levels(iscale)
            np.multiply(wx, lf, out=tmp)
            sumlx = seq_sum(tmp)
            np.multiply(w, lf, out=tmp)
            np.multiply(tmp, lf, out=tmp)
            return sumlx, seq_sum(tmp)

        iscale0 = F32(-nmax) / safe_max
        sumlx, suml2 = sums(iscale0)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        best_iscale = iscale0
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + F32(0.1) * F32(step)) / safe_max
            slx, sl2 = sums(iscale)
            upd = (sl2 > 0) & (slx * slx > best * sl2)
            if upd.any():
                scale = np.where(upd, slx / sl2, scale)
                best = np.where(upd, scale * slx, best)
                best_iscale = np.where(upd, iscale, best_iscale)
        levels(best_iscale)
        lf += fnmax
    L = lf.astype(np.uint8)
    if zero.any():
        L[:, zero] = 0
        scale = np.where(zero, F32(0.0), scale)
    return scale.astype(F32, copy=False), L


def nearest_int_f(v: np.ndarray) -> np.ndarray:
    """float32(nearest_int(v)): rint where that is what the bit trick gives (|v| <= 2**22 - 1)."""
    r = np.rint(v)
    big = ~(np.abs(v) <= F32(4194303.0))  # also NaN
    if big.any():
        r[big] = nearest_int(v[big]).astype(F32)
    return r


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for blocks x (n, M): (scale (M,), L (n, M) uint8).

    The C refinement visits the elements one by one and moves one level when that improves the
    weighted fit, updating the running sums.  Until a block's first accepted move its state is the
    pass-start state, so all elements' trials are evaluated at once from that state; the first accepted
    move is applied and the block resumes after it, again all at once (moves are rare, so there are few
    rounds).  A pass without a move leaves a block as it was, so such a block is done: C's `break`.
    """
    n, m = x.shape
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    lo, hi = F32(-nmax), F32(nmax - 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        safe_max = np.where(zero, F32(1.0), mx)
        L = nearest_int_f(x * (F32(-nmax) / safe_max))
        np.clip(L, lo, hi, out=L)
        w = x * x
        wx = w * x
        sumlx = seq_sum(wx * L)
        suml2 = seq_sum(w * L * L)
        rows = np.arange(n)[:, None]
        active = None if not zero.any() else np.flatnonzero(~zero)  # None: every block
        for _ in range(5):
            if active is None:
                xa, wa, wxa, La, sx, s2 = x, w, wx, L.copy(), sumlx.copy(), suml2.copy()
            elif active.size == 0:
                break
            else:
                xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], L[:, active]
                sx, s2 = sumlx[active], suml2[active]
            k = xa.shape[1]
            moved = np.zeros(k, dtype=bool)
            start = np.zeros(k, dtype=np.intp)
            todo = None  # None: all k blocks of this pass
            while True:
                if todo is None:
                    xt, wt, wxt, Lt, sxt, s2t = xa, wa, wxa, La, sx, s2
                else:
                    xt, wt, wxt, Lt = xa[:, todo], wa[:, todo], wxa[:, todo], La[:, todo]
                    sxt, s2t = sx[todo], s2[todo]
                slx = sxt - wxt * Lt
                sl2 = s2t - wt * Lt * Lt
                new_l = nearest_int_f(xt * sl2 / slx)
                np.clip(new_l, lo, hi, out=new_l)
                cand = (slx > 0) & (new_l != Lt)
                if todo is not None:
                    cand &= rows >= start[todo]
                flat = np.flatnonzero(cand)  # ordered by element, then block
                if flat.size == 0:
                    break
                kt = cand.shape[1]
                bb = flat % kt
                nl = new_l.ravel()[flat]
                slx_c = slx.ravel()[flat] + wxt.ravel()[flat] * nl
                sl2_c = sl2.ravel()[flat] + wt.ravel()[flat] * nl * nl
                sx_c, s2_c = sxt[bb], s2t[bb]
                acc = (sl2_c > 0) & (slx_c * slx_c * s2_c > sx_c * sx_c * sl2_c)
                if not acc.any():
                    break
                flat, bb, nl, slx_c, sl2_c = flat[acc], bb[acc], nl[acc], slx_c[acc], sl2_c[acc]
                # each block's first accepted element (flat is ordered by element index)
                pick = np.full(kt, flat.size, dtype=np.intp)
                np.minimum.at(pick, bb, np.arange(flat.size))
                ub = np.flatnonzero(pick < flat.size)
                first = pick[ub]
                pos = ub if todo is None else todo[ub]
                i_star = flat[first] // kt
                La[i_star, pos] = nl[first]
                sx[pos] = slx_c[first]
                s2[pos] = sl2_c[first]
                moved[pos] = True
                start[pos] = i_star + 1
                todo = pos
            if active is None:
                L, sumlx, suml2 = La, sx, s2
                active = np.flatnonzero(moved)
            else:
                L[:, active], sumlx[active], suml2[active] = La, sx, s2
                active = active[moved]
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    Lu = (L + F32(nmax)).astype(np.uint8)
    if zero.any():
        Lu[:, zero] = 0
        scale = np.where(zero, F32(0.0), scale)
    return scale.astype(F32, copy=False), Lu


# best_index_int8(16, kvalues_iq4nl, x) is the number of midpoints m_k (between neighbouring levels) with
# x >= m_k: the C comparison `x - v[k] < v[k+1] - x` is exact near a midpoint and cannot flip elsewhere.
# Midpoints are multiples of 0.5, so floor(2x) decides: a table over the integers floor(2x) in
# [_IQ4_LO, _IQ4_HI] (clamping outside).  fmin/fmax send NaN to the top level, as the C search does.
_IQ4_MID2 = (IQ4NL_VALUES[:-1].astype(np.int32) + IQ4NL_VALUES[1:].astype(np.int32))  # 2 * midpoints
_IQ4_LO, _IQ4_HI = -256, 228
_IQ4_INDEX = np.searchsorted(_IQ4_MID2, np.arange(_IQ4_LO, _IQ4_HI + 1), side="right").astype(np.uint8)
_IQ4_LEVEL = IQ4NL_VALUES.astype(F32)[_IQ4_INDEX]


def _iq4_table_pos(twice: np.ndarray) -> np.ndarray:
    """floor(2x) clamped to the table range, as int offsets into _IQ4_INDEX (input is 2x, overwritten)."""
    np.floor(twice, out=twice)
    np.fmin(twice, F32(_IQ4_HI), out=twice)
    np.fmax(twice, F32(_IQ4_LO), out=twice)
    twice -= F32(_IQ4_LO)
    return twice.astype(np.intp)


def iq4_best_index(al: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, al) elementwise -> uint8 level index."""
    return _IQ4_INDEX[_iq4_table_pos(al * F32(2.0))]


def iq4_block_scales(x: np.ndarray, w: np.ndarray, ntry: int = 7) -> np.ndarray:
    """The per-block scale search of quantize_row_iq4_nl_impl (ntry > 0) for blocks x (n, M), weights w.

    Returns scales (M,), 0 for blocks with max|x| < GROUP_MAX_EPS.
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    v0 = F32(IQ4NL_VALUES[0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        safe_max = np.where(zero, F32(1.0), mx)
        tmp = np.empty_like(x)
        d = -safe_max / v0
        id0 = F32(1.0) / d
        sumqx, sumq2 = _iq4_sums(x, w, id0, tmp)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0.0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            id_ = F32(itry + int(IQ4NL_VALUES[0])) / safe_max
            sqx, sq2 = _iq4_sums(x, w, id_, tmp)
            upd = (sq2 > 0) & (sqx * sqx > best * sq2)
            if upd.any():
                d = np.where(upd, sqx / sq2, d)
                best = np.where(upd, d * sqx, best)
    return np.where(zero, F32(0.0), d).astype(F32, copy=False)


def _iq4_sums(x: np.ndarray, w: np.ndarray, id_: np.ndarray, tmp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx = sum (w*q)*x, sumq2 = sum (w*q)*q with q = kvalues[best_index(id*x)], in C's order."""
    np.multiply(x, id_ * F32(2.0), out=tmp)  # 2*(id*x) exactly: scaling by 2 commutes with rounding
    q = _IQ4_LEVEL[_iq4_table_pos(tmp)]
    wq = w * q
    np.multiply(wq, x, out=tmp)
    sumqx = seq_sum(tmp)
    np.multiply(wq, q, out=tmp)
    return sumqx, seq_sum(tmp)


def legacy_blocks(rows: np.ndarray, importance: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and levels of Q4_0 (nmax 8) / Q5_0 (nmax 16) for rows (R, N), 32-weight blocks.

    Returns (d as fp16 bytes (R*N/32, 2), L (R*N/32, 32) uint8 levels in [0, 2*nmax-1]).  With an imatrix:
    quantize_row_q{4,5}_0_impl; without: quantize_row_q{4,5}_0_ref.
    """
    n_rows, n = rows.shape
    n_blocks = n_rows * n // 32
    d_bytes = np.empty((n_blocks, 2), dtype=np.uint8)
    L = np.empty((n_blocks, 32), dtype=np.uint8)
    rows_per = max(1, CHUNK_WEIGHTS // n)
    bpr = n // 32
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for r0 in range(0, n_rows, rows_per):
            part = rows[r0:r0 + rows_per]
            sel = slice(r0 * bpr, (r0 + part.shape[0]) * bpr)
            x = blocks_T(part, 32)
            if importance is None:
                d, lv = _legacy_ref(x, nmax)
            else:
                sigma2 = row_sum_sq(part) / F32(n)
                s2 = np.repeat(sigma2, bpr)[None, :]
                qw = np.broadcast_to(importance.reshape(bpr, 32), (part.shape[0], bpr, 32))
                w = blocks_T(np.ascontiguousarray(qw), 32) * np.sqrt(s2 + x * x)
                d, lv = make_qx_quants(x, nmax, w)
            d_bytes[sel] = fp16_bits(d)
            L[sel] = lv.T
    return d_bytes, L


def _legacy_ref(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nmax, levels MIN(2nmax-1, (int8)(x*id + nmax + 0.5))."""
    _, mx = first_absmax(x)
    d = mx / F32(-nmax)
    idd = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0))
    v = np.trunc(x * idd + F32(nmax + 0.5))
    return d, np.minimum(2 * nmax - 1, v).astype(np.uint8)
