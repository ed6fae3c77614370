"""Shared float32 search routines of ggml's affine (scale + min) quantizers, vectorised over blocks.

ggml-quants.c quantizes each (sub-)block with a small iterative search (make_qkx2_quants/make_qkx3_quants
for the weights, make_qp_quants for the 6/4-bit sub-block scales).  To reproduce its bytes exactly every
operation here is the same float32 operation in the same order as the C source (libggml-base is built
without FMA or fast-math), only applied to many blocks at once.

Layout convention: a group of blocks is an array of shape (n, M) -- element index first, block index
second, C-contiguous.  Then an elementwise step is one numpy call over all blocks, and a C loop
`s = 0; for i: s += t[i]` is `np.add.reduce(t, axis=0)`, which numpy evaluates row by row (sequentially,
no pairwise summation) when the reduced axis is the outer one; `seq_sum` guards the case where it is not.

This numpy code is the readable reference.  affine_numba.py holds compiled twins of the drivers (same bytes,
several times faster); the per-type modules use them when affine_numba.USE_NUMBA is set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits
_NI_SAFE = 4194303.0  # |x| up to which nearest_int(x) == rint(x)
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit trick, exact for every float32 input (also out of range, inf, NaN)."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 -> float32 (GGML_FP32_TO_FP16 then back; both round-half-even like numpy)."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def seq_sum(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order starting from +0.0, like C's `float s = 0; for (...) s += t[i];`."""
    if t.shape[1] >= 2:
        return np.add.reduce(np.ascontiguousarray(t), axis=0)
    acc = np.zeros(t.shape[1:], dtype=F32)
    for row in t:  # a single column would make numpy reduce along the inner (pairwise-summed) axis
        acc = acc + row
    return acc


def seq_sum_first(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0 starting from the first term (C `s = t[0]; for (i = 1...) s += t[i]`).

    Differs from `seq_sum` only in the sign of an all-zero result: -0.0 when every term is -0.0.
    """
    s = seq_sum(t)
    zero = s == 0
    if zero.any():
        s[zero] = np.where(np.signbit(t[:, zero]).all(axis=0), F32(-0.0), F32(0.0))
    return s


def seq_min(x: np.ndarray) -> np.ndarray:
    """C `m = x[0]; for: if (x[i] < m) m = x[i];` over axis 0, including the sign of a zero minimum."""
    return _first_zero_sign(x, np.min(x, axis=0))


def seq_max(x: np.ndarray) -> np.ndarray:
    """C `m = x[0]; for: if (x[i] > m) m = x[i];` over axis 0, including the sign of a zero maximum."""
    return _first_zero_sign(x, np.max(x, axis=0))


def _first_zero_sign(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """A strict-comparison scan that ends on the value 0 keeps the first zero it met (numpy may not)."""
    zero = m == 0
    if zero.any():
        xz = x[:, zero]
        first = np.argmax(xz == 0, axis=0)
        m[zero] = xz[first, np.arange(xz.shape[1])]
    return m


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (identical when weights are given) for blocks x (n, M).

    Returns (scale (M,), the_min (M,) -- the negated offset, L (n, M) uint8 levels in [0, nmax]).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(w, dtype=F32)
    xmin = seq_min(x)
    xmax = np.max(x, axis=0)
    mn = np.where(xmin > 0, F32(0.0), xmin)
    flat = xmax == mn
    sum_w = seq_sum_first(w)
    sum_x = seq_sum_first(w * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = xmax - mn
        rng[flat] = F32(1.0)  # placeholder: flat blocks are overwritten at the end
        iscale = F32(nmax) / rng
        scale = F32(1.0) / iscale
        xm = x - mn
        la = np.empty_like(x)  # work buffers, reused: fresh MB-sized arrays cost page faults
        tmp = np.empty_like(x)
        wl = np.empty_like(x)
        _levels(xm, iscale, mn, xmin, xmax, nmax, la)
        best = _weighted_error(la, scale, mn, x, w, use_mad, tmp)
        # L is a function of (iscale, mn) per block: remember those for the winning step and rebuild
        # L once at the end instead of copying level arrays on every improvement.
        L_iscale, L_mn = iscale, mn
        if nstep >= 1:
            fnmax, frmin, frdelta = F32(nmax), F32(rmin), F32(rdelta)
            mn_changed = False
            for step in range(nstep + 1):
                num = (frmin + frdelta * F32(step)) + fnmax
                iscale = num / (xmax - mn)
                iscale[flat] = F32(0.0)
                if mn_changed:
                    np.subtract(x, mn, out=xm)
                _levels(xm, iscale, mn, xmin, xmax, nmax, la)
                np.multiply(w, la, out=wl)
                sum_l = seq_sum(wl)
                np.multiply(wl, la, out=tmp)
                sum_l2 = seq_sum(tmp)
                np.multiply(wl, x, out=tmp)
                sum_xl = seq_sum(tmp)
                D = sum_w * sum_l2 - sum_l * sum_l
                ok = D > 0
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                if pos.any():
                    this_min[pos] = F32(0.0)
                    this_scale[pos] = (sum_xl / sum_l2)[pos]
                cur = _weighted_error(la, this_scale, this_min, x, w, use_mad, tmp)
                upd = ok & (cur < best)
                mn_changed = bool(upd.any())
                if mn_changed:
                    L_iscale = np.where(upd, iscale, L_iscale)
                    L_mn = np.where(upd, mn, L_mn)
                    best = np.where(upd, cur, best)
                    scale = np.where(upd, this_scale, scale)
                    mn = np.where(upd, this_min, mn)
        if nstep >= 1:
            np.subtract(x, L_mn, out=xm)
            _levels(xm, L_iscale, L_mn, xmin, xmax, nmax, la)
    L = la.astype(np.uint8)
    if flat.any():
        L[:, flat] = 0
        scale[flat] = F32(0.0)
        mn[flat] = np.where(xmin > 0, F32(0.0), xmin)[flat]
    return scale.astype(F32), (-mn).astype(F32), L


def _levels(xm: np.ndarray, iscale: np.ndarray, mn: np.ndarray, xmin: np.ndarray, xmax: np.ndarray,
            nmax: int, out: np.ndarray) -> None:
    """out = MAX(0, MIN(nmax, nearest_int(iscale * (x - mn)))) as float32; xm holds x - mn."""
    np.multiply(xm, iscale, out=out)
    # |x - mn| <= spread, so |iscale * (x - mn)| <= bound (rounding is monotonic)
    spread = np.maximum(np.abs(xmax - mn), np.abs(xmin - mn))
    if np.all(np.abs(iscale) * spread <= _NI_SAFE):  # then nearest_int == rint (False for NaN/inf)
        np.rint(out, out=out)
        np.clip(out, F32(0.0), F32(nmax), out=out)  # (np.minimum with a scalar is ~8x slower)
    else:
        out[...] = np.clip(nearest_int(out), 0, nmax)


def _weighted_error(la: np.ndarray, scale: np.ndarray, mn: np.ndarray, x: np.ndarray, w: np.ndarray,
                    use_mad: bool, tmp: np.ndarray) -> np.ndarray:
    """C `e = 0; for: diff = scale*L + min - x; e += w * (use_mad ? |diff| : diff*diff)`."""
    np.multiply(la, scale, out=tmp)
    tmp += mn
    tmp -= x
    if use_mad:
        np.abs(tmp, out=tmp)
    else:
        np.multiply(tmp, tmp, out=tmp)
    tmp *= w
    return seq_sum(tmp)


def make_qp(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: non-negative values x (n, M) -> (scale (M,), L (n, M) uint8), weighted by qw."""
    x = np.ascontiguousarray(x, dtype=F32)
    qw = np.ascontiguousarray(qw, dtype=F32)
    n, m = x.shape
    fnmax = F32(nmax)
    mx = np.maximum(np.max(x, axis=0), F32(0.0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mx_safe = np.where(zero, F32(1.0), mx)
        iscale = fnmax / mx_safe
        Lu = (nearest_int(iscale * x) & 0xFF).astype(F32)  # stored to uint8
        scale = F32(1.0) / iscale
        diff = x - scale * Lu
        best = seq_sum(qw * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_is = (F32(0.1) * F32(step) + fnmax) / mx_safe
            scale_is = F32(1.0) / iscale_is
            li = np.minimum(nearest_int(iscale_is * x), nmax).astype(F32)
            diff = x - scale_is * li
            mse = seq_sum(qw * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        li = np.minimum(nearest_int(iscale * x), nmax)
        L = li & 0xFF  # uint8 values as C holds them
        lf = li.astype(F32)
        sumlx = seq_sum(qw * x * lf)
        suml2 = seq_sum(qw * lf * lf)
        # The C loop stops after a pass without change; such a pass leaves the state as it was, so
        # running all 5 passes gives the same result per block.
        for _ in range(5):
            changed = False
            for i in range(n):
                wi, xi = qw[i], x[i]
                Li = L[i].astype(F32)
                slx = sumlx - wi * xi * Li
                sl2 = suml2 - wi * Li * Li
                cand = (slx > 0) & (sl2 > 0)
                if not cand.any():
                    continue
                new_l = np.minimum(nearest_int(xi * sl2 / slx), nmax)
                cand &= new_l != L[i]
                if not cand.any():
                    continue
                nf = new_l.astype(F32)
                slx = slx + wi * xi * nf
                sl2 = sl2 + wi * nf * nf
                acc = cand & (slx * slx * suml2 > sumlx * sumlx * sl2)
                if acc.any():
                    changed = True
                    L[i] = np.where(acc, new_l & 0xFF, L[i])
                    sumlx = np.where(acc, slx, sumlx)
                    suml2 = np.where(acc, sl2, suml2)
            if not changed:
                break
        out = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(F32)
    L = L.astype(np.uint8)
    if zero.any():
        L[:, zero] = 0
        out[zero] = F32(0.0)
    return out, L


def pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales from 8 sub-block scales and mins (each (8, M) uint8) -> (M, 12) uint8.

    Mirrors the C stores bit for bit, including what happens to values above 63.
    """
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((12, ls.shape[1]), dtype=np.uint8)
    out[0:4] = ls[0:4]
    out[4:8] = lm[0:4]
    out[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    out[0:4] |= (ls[4:8] >> 4) << 6
    out[4:8] |= (lm[4:8] >> 4) << 6
    return np.ascontiguousarray(out.T)


def unpack_k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: (M, 12) uint8 -> (sc (8, M), m (8, M)) uint8."""
    q = sc.T
    d = np.empty((8, q.shape[1]), dtype=np.uint8)
    m = np.empty_like(d)
    d[0:4] = q[0:4] & 63
    m[0:4] = q[4:8] & 63
    d[4:8] = (q[8:12] & 0xF) | ((q[0:4] >> 6) << 4)
    m[4:8] = (q[8:12] >> 4) | ((q[4:8] >> 6) << 4)
    return d, m


def requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray, L: np.ndarray, nmax: int) -> np.ndarray:
    """Final pass of the K-quants: L = clamp(nearest_int((x + dm) / d)) where d != 0, else L unchanged.

    x, L: (n, M); d, dm: (M,) float32 (already fp16-rounded scale times the sub-block level).
    """
    live = d != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        li = np.clip(nearest_int((x + dm) / np.where(live, d, F32(1.0))), 0, nmax).astype(np.uint8)
    return np.where(live, li, L)


def tile_importance(importance: np.ndarray | None, n_rows: int, n_per_row: int) -> np.ndarray | None:
    """The per-column importance repeated for every row: (n_rows * n_per_row,) float32, or None."""
    if importance is None:
        return None
    return np.broadcast_to(np.asarray(importance, dtype=F32), (n_rows, n_per_row)).reshape(-1)


def block_chunks(n_blocks: int, block_len: int, target: int = 1 << 18):
    """Slices of about `target` weights, so the (n, M) work arrays stay cache-sized."""
    step = max(1, target // block_len)
    for s in range(0, n_blocks, step):
        yield slice(s, min(n_blocks, s + step))


def subblocks(x: np.ndarray, n: int) -> np.ndarray:
    """(nB, 256) super-blocks -> (n, nB * 256 // n) sub-blocks, column b * (256 // n) + j = sub-block j of b."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def importance_blocks(importance: np.ndarray, sl: slice, blocks_per_row: int, block_len: int) -> np.ndarray:
    """Importance for flat blocks sl of all rows (block g uses columns of block g % blocks_per_row)."""
    imp = np.asarray(importance, dtype=F32).reshape(blocks_per_row, block_len)
    return imp[np.arange(sl.start, sl.stop) % blocks_per_row]


def k_superblock_stats(x: np.ndarray) -> np.ndarray:
    """C `sum_x2 = 0; for l < 256: sum_x2 += x[l]*x[l]` per super-block of x (nB, 256) -> (nB,)."""
    xt = np.ascontiguousarray(x.T)
    return seq_sum(xt * xt)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (M,) -> (M, 2) uint8 little-endian fp16."""
    return np.asarray(v, dtype=F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def positive_max(v: np.ndarray) -> np.ndarray:
    """C `m = 0; for: if (v[j] > m) m = v[j];` over the last axis (+0.0 when nothing is positive)."""
    m = np.max(v, axis=-1)
    return np.where(m > 0, m, F32(0.0)).astype(F32)


def k4_levels(xb: np.ndarray, qw: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int],
              clamp_qp_levels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks (8 sub-blocks of 32 with 6-bit scales and mins) up to the packed levels.

    xb: (nB, 256); qw: matching importance (nB, 256) or None (quantize_row_q*_K_ref path).
    Returns (d (nB,) fp16-rounded, dmin (nB,), scales (nB, 12) uint8, L (nB, 256) uint8 in [0, nmax]).
    """
    nB = xb.shape[0]
    xs = subblocks(xb, 32)
    if qw is None:
        sum_x2 = seq_sum(xs * xs)
        av_x = np.sqrt(sum_x2 / F32(32))
        w = av_x + np.abs(xs)
        rmin, rdelta, nstep = ref_search
        scale, the_min, L = make_qkx(xs, w, nmax, rmin, rdelta, nstep, False)
        sw = None
    else:
        sigma2 = F32(2.0) * k_superblock_stats(xb) / F32(256)
        sig = np.repeat(sigma2, 8)
        w = subblocks(qw, 32) * np.sqrt(sig + xs * xs)
        sw = seq_sum(w)
        scale, the_min, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, False)
    d, dmin, sc, dd, dm = k4_scales(scale, the_min, sw, clamp_qp_levels)
    L = requantize(xs, dd, dm, L, nmax)
    return d, dmin, sc, np.ascontiguousarray(L.T).reshape(nB, 256)


def k4_scales(scale: np.ndarray, the_min: np.ndarray, sw: np.ndarray | None, clamp_qp_levels: bool,
              qp: Callable[..., tuple[np.ndarray, np.ndarray]] = make_qp
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 8 sub-block (scale, the_min) of each super-block (flat (nB * 8,), sub-block j of
    super-block b at b * 8 + j) -> stored scales.

    sw: None on the ref path (6-bit scales relative to the largest), else the sub-block weight sums that
    make_qp weighs the scales with (qp: make_qp or a drop-in replacement).  Returns (d, dmin (nB,)
    fp16-rounded, packed scales (nB, 12) uint8, dd, dm (nB * 8,) the sub-block scale and min to requantize with).
    """
    nB = scale.shape[0] // 8
    if sw is None:
        scales, mins = scale.reshape(nB, 8), the_min.reshape(nB, 8)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0)).astype(F32)
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).T
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).T
        d_block, m_block = max_scale / F32(63.0), max_min / F32(63.0)
    else:
        sw8 = np.ascontiguousarray(sw.reshape(nB, 8).T)
        d_block, ls = qp(np.ascontiguousarray(scale.reshape(nB, 8).T), sw8, 63)
        m_block, lm = qp(np.ascontiguousarray(the_min.reshape(nB, 8).T), sw8, 63)
        if clamp_qp_levels:
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    sc = pack_k4_scales(ls, lm)
    d, dmin = fp16_round(d_block), fp16_round(m_block)
    usc, um = unpack_k4_scales(sc)
    dd = (d[:, None] * usc.T.astype(F32)).reshape(-1)
    dm = (dmin[:, None] * um.T.astype(F32)).reshape(-1)
    return d, dmin, sc, dd, dm


def q2k_levels(xb: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K super-blocks (16 sub-blocks of 16, 4-bit scales and mins) up to the packed levels.

    xb: (nB, 256); qw: matching importance or None (quantize_row_q2_K_ref: make_qkx2 with the absolute-error
    metric, max-normalised scales; else quantize_row_q2_K_impl: weighted make_qkx3 + make_qp_quants).
    Returns (d, dmin (nB,) fp16-rounded, scales (nB, 16) uint8, L (nB, 256) uint8 in [0, 3]).
    """
    nB = xb.shape[0]
    xs = subblocks(xb, 16)
    if qw is None:
        scale, the_min, L = make_qkx(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        sw = None
    else:
        sigma2 = k_superblock_stats(xb) / F32(256)
        w = subblocks(qw, 16) * np.sqrt(np.repeat(sigma2, 16) + xs * xs)
        sw = seq_sum(w)
        scale, the_min, L = make_qkx(xs, w, 3, -0.9, 0.05, 36, False)
    d, dmin, sc, dd, dm = q2k_scales(scale, the_min, sw)
    L = requantize(xs, dd, dm, L, 3)
    return d, dmin, sc, np.ascontiguousarray(L.T).reshape(nB, 256)


def q2k_scales(scale: np.ndarray, the_min: np.ndarray, sw: np.ndarray | None,
               qp: Callable[..., tuple[np.ndarray, np.ndarray]] = make_qp
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K: the 16 sub-block (scale, the_min) of each super-block (flat (nB * 16,)) -> stored scales.

    sw: None on the ref path, else the sub-block weight sums for make_qp (qp: make_qp or a drop-in
    replacement).  Returns (d, dmin (nB,) fp16-rounded, scales (nB, 16) uint8, dd, dm (nB * 16,)).
    """
    nB = scale.shape[0] // 16
    if sw is None:
        scales, mins = scale.reshape(nB, 16), the_min.reshape(nB, 16)
        max_scale, max_min = positive_max(scales), positive_max(mins)
        with np.errstate(divide="ignore"):
            isc = np.where(max_scale > 0, F32(15.0) / max_scale, F32(0.0)).astype(F32)
            imn = np.where(max_min > 0, F32(15.0) / max_min, F32(0.0)).astype(F32)
        lsc = np.where(max_scale[:, None] > 0, nearest_int(isc[:, None] * scales), 0) & 0xFF
        lmn = np.where(max_min[:, None] > 0, nearest_int(imn[:, None] * mins) << 4, 0) & 0xFF
        sc = (lsc | lmn).astype(np.uint8)
        d = fp16_round(np.where(max_scale > 0, max_scale / F32(15.0), F32(0.0)))
        dmin = fp16_round(np.where(max_min > 0, max_min / F32(15.0), F32(0.0)))
    else:
        sw16 = np.ascontiguousarray(sw.reshape(nB, 16).T)
        dm, ls = qp(np.ascontiguousarray(scale.reshape(nB, 16).T), sw16, 15)
        mm, lm = qp(np.ascontiguousarray(the_min.reshape(nB, 16).T), sw16, 15)
        d, dmin = fp16_round(dm), fp16_round(mm)
        sc = np.ascontiguousarray((ls | (lm << 4)).T).astype(np.uint8)
    dd = (d[:, None] * (sc & 0xF).astype(F32)).reshape(-1)
    dm_ = (dmin[:, None] * (sc >> 4).astype(F32)).reshape(-1)
    return d, dmin, sc, dd, dm_


def legacy_affine_levels(rows: np.ndarray, importance: np.ndarray, nmax: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_impl / q5_1_impl with importance: rows (R, n_per_row) -> per 32-block
    (d (R*nb,) fp16-rounded, m (R*nb,) fp16-rounded, L (R*nb, 32) uint8).

    The weights use sigma2 = mean of x^2 over the whole row, summed in row order.
    """
    R, n_per_row = rows.shape
    nb = n_per_row // 32
    rt = np.ascontiguousarray(rows.T)
    sigma2 = seq_sum(rt * rt) / F32(n_per_row)
    xs = subblocks(rows, 32)  # column r * nb + ib
    qw = subblocks(np.broadcast_to(np.asarray(importance, dtype=F32), rows.shape), 32)
    w = qw * np.sqrt(np.repeat(sigma2, nb) + xs * xs)
    scale, the_min, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, False)
    return fp16_round(scale), fp16_round(-the_min), np.ascontiguousarray(L.T)


def row_chunks(n_rows: int, n_per_row: int, target: int = 1 << 18):
    """Slices of whole rows, about `target` weights each."""
    step = max(1, target // max(1, n_per_row))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def _float_to_byte(v: np.ndarray) -> np.ndarray:
    """C's (u)int8 conversion of a float as x86 code does it: truncate to int32 (INT_MIN when out of
    range or NaN), keep the low byte. Returned as int16 in [0, 255]."""
    lo, hi = np.min(v), np.max(v)
    if lo >= 0 and hi < 256:  # the usual case (and False when NaN is present)
        return v.astype(np.int16)
    t = np.trunc(v)
    ok = np.isfinite(t) & (np.abs(t) < F32(2.0**31))
    return (np.where(ok, t, F32(0.0)).astype(np.int64) & 0xFF).astype(np.int16)


def _rowwise_first_zero_sign(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """`_first_zero_sign` for blocks laid out as rows (M, n)."""
    zero = m == 0
    if zero.any():
        xz = x[zero]
        m[zero] = xz[np.arange(xz.shape[0]), np.argmax(xz == 0, axis=1)]
    return m


def legacy_affine_ref(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref (nmax 15) / quantize_row_q5_1_ref (nmax 31) on 32-blocks (M, 32) ->
    (d, m fp16-rounded (M,), L (M, 32) uint8 as the C code stores it before packing)."""
    x = np.asarray(blocks, dtype=F32)
    # C scans from FLT_MAX / -FLT_MAX with strict comparisons: same values, first zero's sign
    mn = _rowwise_first_zero_sign(x, np.min(x, axis=1))
    mx = _rowwise_first_zero_sign(x, np.max(x, axis=1))
    d = (mx - mn) / F32(nmax)
    ident = np.where(d != 0, F32(1.0) / np.where(d != 0, d, F32(1.0)), F32(0.0)).astype(F32)
    v = x - mn[:, None]
    v *= ident[:, None]
    v += F32(0.5)
    lo, hi = np.min(v), np.max(v)
    if lo >= 0 and hi < 128:  # the usual case (False with NaN): plain truncation, no sign games
        b = v.astype(np.uint8)
        if nmax == 15:
            np.minimum(b, np.uint8(15), out=b)
        return fp16_round(d), fp16_round(mn), b
    b = _float_to_byte(v)
    if nmax == 15:  # MIN(15, (int8_t)v): signed byte, then stored as uint8
        b = np.minimum(15, (b ^ 0x80) - 0x80) & 0xFF
    return fp16_round(d), fp16_round(mn), b.astype(np.uint8)


def quantize_superblocks(rows: np.ndarray, importance: np.ndarray | None, block_bytes: int,
                         fill_chunk) -> np.ndarray:
    """Shared driver of the 256-weight K-quants: rows -> super-blocks, `fill_chunk(x, qw, out)` per chunk.

    `fill_chunk` gets a chunk of super-blocks (n, 256), their importance (same shape, or None) and the (n,
    block_bytes) uint8 view to write; overflow to inf/NaN is what ggml does too (huge values), so it is silenced.
    """
    n_rows, n_per_row = rows.shape
    nb = n_per_row // 256
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 256)
    out = np.empty((x.shape[0], block_bytes), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for sl in block_chunks(x.shape[0], 256):
            qw = None if importance is None else importance_blocks(importance, sl, nb, 256)
            fill_chunk(x[sl], qw, out[sl])
    return out.reshape(n_rows, nb * block_bytes)


def quantize_legacy_affine(rows: np.ndarray, importance: np.ndarray | None, nmax: int, block_bytes: int,
                           pack_levels: Callable[[np.ndarray, np.ndarray], None],
                           levels: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                           ref: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Shared driver of Q4_1/Q5_1: fp16 d and m per 32-weight block, then `pack_levels(L, o)` writes the levels
    into o[:, 4:] (L is (n_blocks, 32) uint8).  levels / ref: drop-in replacements of legacy_affine_levels /
    legacy_affine_ref (the compiled ones of affine_numba); None for the numpy ones."""
    levels = levels or legacy_affine_levels
    ref = ref or legacy_affine_ref
    n_rows, n_per_row = rows.shape
    nb = n_per_row // 32
    out = np.empty((n_rows, nb, block_bytes), dtype=np.uint8)
    with np.errstate(all="ignore"):  # overflow to inf/NaN is what ggml does too (huge values)
        for sl in row_chunks(n_rows, n_per_row):
            chunk = np.ascontiguousarray(rows[sl], dtype=np.float32)
            if importance is None:
                d, m, L = ref(chunk.reshape(-1, 32), nmax)
            else:
                d, m, L = levels(chunk, importance, nmax)
            o = out[sl].reshape(-1, block_bytes)  # a view: out is contiguous
            o[:, 0:2] = fp16_bytes(d)
            o[:, 2:4] = fp16_bytes(m)
            pack_levels(L, o)
    return out.reshape(n_rows, nb * block_bytes)
