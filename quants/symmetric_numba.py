"""Optional numba kernels for the symmetric searches of symmetric_search.py (same float32 ops, same order).

The numpy routines in symmetric_search.py (and the per-type modules) are the readable, tested reference;
these kernels compute the same bytes faster.  Each SIMD lane is one block: blocks are copied into a tile
(a flat float32 array, element i of tile block b at i*TILE + b) and the block index is the innermost loop,
so LLVM vectorises without reordering any per-block sum (each lane still adds its terms in element order).
The make_qx_quants sums run over 8 elements at a time with the per-block running sums in locals: LLVM
unrolls those 8 (a constant trip count) and keeps the sums in registers instead of a load and a store per
element (about 1.8x faster).  No fastmath, so no FMA contraction or reassociation (libggml-base is built
the same way); error_model="numpy" gives IEEE division (inf/NaN instead of exceptions), as C does.

Covered: make_qx_quants(rmse_type=1, weights) for Q4_0/Q5_0 with an imatrix (quantize_row_q{4,5}_0_impl),
for Q6_K (with and without an imatrix) and for Q3_K with an imatrix (q3k_levels: the per-sub-block level
search of quantize_row_q3_K_impl); the IQ4_NL / IQ4_XS block-scale search (quantize_row_iq4_nl_impl,
ntry 7) and their final level choice.  `AVAILABLE` is False when numba is missing or a kernel cannot be
compiled; every caller also checks its fast path against its numpy path at import (`self_check`) and uses
numpy on any mismatch.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_search
from quants.symmetric_search import F32, IQ4NL_VALUES, fp16_bits

try:  # pragma: no cover - exercised when numba is installed
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None

TILE = 64  # blocks per tile: a tile of n*TILE float32 (and its weights) stays in L1
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_MAGIC = F32(12582912.0)
_MANT = np.int32(0x007FFFFF)
_HALF = np.int32(0x00400000)
_TENTH = F32(0.1)
_ONE = F32(1.0)
_ZERO = F32(0.0)
# IQ4 grid: best_index_int8(16, kvalues_iq4nl, x) is the number of midpoints m_k with !(x < m_k) (exact; NaN
# counts every midpoint, as C's binary search ends at the top level).  The level is then the lowest value
# plus the steps between neighbours that were passed; all these float32 sums of integers are exact.
_IQ4_V = IQ4NL_VALUES.astype(F32)
_IQ4_MID = ((IQ4NL_VALUES[:-1].astype(np.int32) + IQ4NL_VALUES[1:].astype(np.int32)) / 2).astype(F32)
_IQ4_STEP = np.diff(IQ4NL_VALUES.astype(np.int32)).astype(F32)
_IQ4_V0 = _IQ4_V[0]

_FAILED: list[str] = []


def _jit(**opts):
    """numba.njit(cache=True, error_model='numpy') or, without numba, the plain function (never called)."""
    def deco(fn):
        if _numba is None:
            return fn
        try:
            return _numba.njit(cache=True, nogil=True, error_model="numpy", **opts)(fn)
        except Exception:  # pragma: no cover - e.g. no cache locator on a read-only install
            _FAILED.append(fn.__name__)
            return fn
    return deco


@_jit(inline="always")
def _near(v):
    """ggml's nearest_int(v) (the float bit trick, exact for every float32 incl. out of range and NaN)."""
    bits = np.float32(v + _MAGIC).view(np.int32)
    return (bits & _MANT) - _HALF


@_jit(inline="always")
def _iq4_level(al):
    """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, al)] as float32."""
    q = _IQ4_V0
    for k in range(15):
        if not al < _IQ4_MID[k]:
            q += _IQ4_STEP[k]
    return q


@_jit(inline="always")
def _iq4_index(al):
    """best_index_int8(16, kvalues_iq4nl, al)."""
    idx = 0
    for k in range(15):
        if not al < _IQ4_MID[k]:
            idx += 1
    return idx


@_jit()
def _first_absmax(xt, n, nb, amax, mx):
    """Per tile block b < nb: `amax = max = 0; for i: if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`."""
    for b in range(nb):
        amax[b] = _ZERO
        mx[b] = _ZERO
    for k in range(n // 8):
        for b in range(nb):
            a = amax[b]
            m = mx[b]
            for i in range(8 * k, 8 * k + 8):
                v = xt[i * TILE + b]
                if abs(v) > a:
                    a = abs(v)
                    m = v
            amax[b] = a
            mx[b] = m


@_jit()
def _qx_sums(xt, wt, n, nb, isc, lo, hi, sx, s2):
    """Per tile block: sumlx = sum w*x*l, suml2 = sum w*l*l, l = clamp(nearest_int(iscale*x)), in order.

    |iscale*x| <= nmax + 1 here, where nearest_int is rint."""
    for b in range(nb):
        sx[b] = _ZERO
        s2[b] = _ZERO
    for k in range(n // 8):
        for b in range(nb):
            s = isc[b]
            a = sx[b]
            c = s2[b]
            for i in range(8 * k, 8 * k + 8):
                v = xt[i * TILE + b]
                w = wt[i * TILE + b]
                lf = min(hi, max(lo, np.rint(s * v)))
                a += w * v * lf
                c += w * lf * lf
            sx[b] = a
            s2[b] = c


@_jit()
def _qx_tile(xt, wt, n, nb, nmax, scale, lev, ws):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) for the first nb blocks of the tile xt (n*TILE,), n a
    multiple of 8, all x finite.

    scale (TILE,) and lev (n*TILE,) uint8 (levels + nmax; 0 for an all-zero block) are written; ws is
    (7, TILE) float32 scratch.  A block with max|x| < GROUP_MAX_EPS is computed with max = 1, then zeroed
    (C returns early for it).
    """
    amax, mx, isc, sx, s2, best, bisc = ws[0], ws[1], ws[2], ws[3], ws[4], ws[5], ws[6]
    fnmax = np.float32(nmax)
    lo = np.float32(-nmax)
    hi = np.float32(nmax - 1)
    _first_absmax(xt, n, nb, amax, mx)
    for b in range(nb):
        if amax[b] < _EPS:
            mx[b] = _ONE
        isc[b] = lo / mx[b]
    _qx_sums(xt, wt, n, nb, isc, lo, hi, sx, s2)
    for b in range(nb):
        sc = sx[b] / s2[b] if s2[b] != _ZERO else _ZERO
        scale[b] = sc
        best[b] = sc * sx[b]
        bisc[b] = isc[b]
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(fnmax + _TENTH * np.float32(step))
        for b in range(nb):
            isc[b] = num / mx[b]
        _qx_sums(xt, wt, n, nb, isc, lo, hi, sx, s2)
        for b in range(nb):
            slx = sx[b]
            sl2 = s2[b]
            if sl2 > _ZERO and slx * slx > best[b] * sl2:
                sc = slx / sl2
                scale[b] = sc
                best[b] = sc * slx
                bisc[b] = isc[b]
    for i in range(n):
        for b in range(nb):
            lf = min(hi, max(lo, np.rint(bisc[b] * xt[i * TILE + b])))
            lev[i * TILE + b] = np.uint8(lf + fnmax)
    for b in range(nb):
        if amax[b] < _EPS:
            scale[b] = _ZERO
            for i in range(n):
                lev[i * TILE + b] = 0


@_jit()
def qx_search(x, w, nmax, scale_out, L_out):
    """make_qx_quants for blocks in the numpy layout x, w (n, M) -> scale_out (M,), L_out (n, M) uint8."""
    n, m = x.shape
    xt = np.zeros(n * TILE, dtype=np.float32)
    wt = np.zeros(n * TILE, dtype=np.float32)
    lev = np.empty(n * TILE, dtype=np.uint8)
    scale = np.empty(TILE, dtype=np.float32)
    ws = np.empty((7, TILE), dtype=np.float32)
    for b0 in range(0, m, TILE):
        nb = min(TILE, m - b0)
        for i in range(n):
            for b in range(nb):
                xt[i * TILE + b] = x[i, b0 + b]
                wt[i * TILE + b] = w[i, b0 + b]
        _qx_tile(xt, wt, n, nb, nmax, scale, lev, ws)
        for b in range(nb):
            scale_out[b0 + b] = scale[b]
        for i in range(n):
            for b in range(nb):
                L_out[i, b0 + b] = lev[i * TILE + b]


@_jit()
def legacy_impl(rows, imp, nmax, d_out, out):
    """quantize_row_q{4,5}_0_impl for rows (R, N) with importance imp (N,): d_out (R*N/32,) float32 (the scale,
    stored as fp16 by the caller) and the block bytes after it in out (R*N/32, 18 or 22): Q4_0 (nmax 8) qs at
    [2:18]; Q5_0 (nmax 16) qh at [2:6], qs at [6:22]."""
    n_rows, n = rows.shape
    bpr = n // 32
    fn = np.float32(n)
    sigma2 = np.empty(n_rows, dtype=np.float32)
    for r in range(n_rows):
        s = _ZERO
        for j in range(n):
            s += rows[r, j] * rows[r, j]
        sigma2[r] = s / fn
    xt = np.zeros(32 * TILE, dtype=np.float32)
    wt = np.zeros(32 * TILE, dtype=np.float32)
    lev = np.empty(32 * TILE, dtype=np.uint8)
    scale = np.empty(TILE, dtype=np.float32)
    sig = np.empty(TILE, dtype=np.float32)
    ws = np.empty((7, TILE), dtype=np.float32)
    n_blocks = n_rows * bpr
    for g0 in range(0, n_blocks, TILE):
        nb = min(TILE, n_blocks - g0)
        for b in range(nb):
            r = (g0 + b) // bpr
            c = 32 * ((g0 + b) - r * bpr)
            sig[b] = sigma2[r]
            for i in range(32):
                xt[i * TILE + b] = rows[r, c + i]
                wt[i * TILE + b] = imp[c + i]
        for i in range(32):
            for b in range(nb):
                v = xt[i * TILE + b]
                wt[i * TILE + b] = wt[i * TILE + b] * np.sqrt(sig[b] + v * v)
        _qx_tile(xt, wt, 32, nb, nmax, scale, lev, ws)
        for b in range(nb):
            g = g0 + b
            d_out[g] = scale[b]
            if nmax == 8:
                for j in range(16):
                    out[g, 2 + j] = lev[j * TILE + b] | (lev[(j + 16) * TILE + b] << 4)
            else:
                qh = 0
                for j in range(32):
                    qh |= ((lev[j * TILE + b] >> 4) & 1) << j
                for k in range(4):
                    out[g, 2 + k] = np.uint8((qh >> (8 * k)) & 0xFF)
                for j in range(16):
                    out[g, 6 + j] = (lev[j * TILE + b] & 0xF) | ((lev[(j + 16) * TILE + b] & 0xF) << 4)


@_jit()
def q6k_levels(xb, imp, has_imp, scales_out, L_out):
    """The 16 make_qx_quants(16, 32, ...) searches of each Q6_K super-block: xb (nb, 256), imp (n_per_row,)
    (weights x*x when not has_imp) -> scales_out (nb, 16) float32, L_out (nb, 256) uint8 in [0, 63]."""
    nsb = xb.shape[0]
    n_imp = imp.shape[0]
    xt = np.zeros(16 * TILE, dtype=np.float32)
    wt = np.zeros(16 * TILE, dtype=np.float32)
    lev = np.empty(16 * TILE, dtype=np.uint8)
    scale = np.empty(TILE, dtype=np.float32)
    ws = np.empty((7, TILE), dtype=np.float32)
    n_sub = nsb * 16
    for g0 in range(0, n_sub, TILE):
        nb = min(TILE, n_sub - g0)
        for b in range(nb):
            s = (g0 + b) // 16
            c = 16 * ((g0 + b) - 16 * s)
            for i in range(16):
                xt[i * TILE + b] = xb[s, c + i]
            if has_imp:
                c0 = (256 * s + c) % n_imp
                for i in range(16):
                    wt[i * TILE + b] = imp[c0 + i]
        if not has_imp:
            for i in range(16):
                for b in range(nb):
                    wt[i * TILE + b] = xt[i * TILE + b] * xt[i * TILE + b]
        _qx_tile(xt, wt, 16, nb, 32, scale, lev, ws)
        for b in range(nb):
            s = (g0 + b) // 16
            j = (g0 + b) - 16 * s
            scales_out[s, j] = scale[b]
            for i in range(16):
                L_out[s, 16 * j + i] = lev[i * TILE + b]


@_jit()
def q6k_pack(xb, L, d, out):
    """Requantize with the stored scales d = fp16(d) * scales[j] (nb, 16) where non-zero, then write the
    ql/qh bytes (out[:, :192]) of each Q6_K super-block."""
    nsb = xb.shape[0]
    for s in range(nsb):
        for j in range(16):
            dj = d[s, j]
            if dj == _ZERO:
                continue
            for i in range(16):
                li = _near(xb[s, 16 * j + i] / dj)
                li = min(31, max(-32, li))
                L[s, 16 * j + i] = np.uint8(li + 32)
        for h in range(2):
            base = 128 * h
            for k in range(32):
                q1 = L[s, base + k]
                q2 = L[s, base + k + 32]
                q3 = L[s, base + k + 64]
                q4 = L[s, base + k + 96]
                out[s, 64 * h + k] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                out[s, 64 * h + k + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                out[s, 128 + 32 * h + k] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@_jit()
def q3k_levels(xb, imp, scales_out, sw_out, L_out):
    """First level of quantize_row_q3_K_impl (with an imatrix) for super-blocks xb (nsb, 256), imp
    (n_per_row,): per 16-sub-block the weights w = qw * sqrtf(sigma2 + x*x), sigma2 = 2*sum(x*x)/256 over the
    super-block, their sum sw -> sw_out (nsb, 16), and make_qx_quants(16, 4, x, w) -> scales_out (nsb, 16),
    L_out (nsb, 256) uint8 in [0, 7].  A tile holds TILE/16 whole super-blocks."""
    nsb = xb.shape[0]
    n_imp = imp.shape[0]
    per = TILE // 16
    xt = np.zeros(16 * TILE, dtype=np.float32)
    wt = np.zeros(16 * TILE, dtype=np.float32)
    lev = np.empty(16 * TILE, dtype=np.uint8)
    scale = np.empty(TILE, dtype=np.float32)
    sig = np.empty(TILE, dtype=np.float32)
    ws = np.empty((7, TILE), dtype=np.float32)
    two = np.float32(2.0)
    fqk = np.float32(256.0)
    for s0 in range(0, nsb, per):
        ns = min(per, nsb - s0)
        nb = 16 * ns
        for t in range(ns):
            acc = _ZERO
            for j in range(256):
                acc += xb[s0 + t, j] * xb[s0 + t, j]
            sg = two * acc / fqk
            for j in range(16):
                sig[16 * t + j] = sg
        for b in range(nb):
            s = s0 + b // 16
            c = 16 * (b % 16)
            c0 = (256 * s + c) % n_imp
            for i in range(16):
                xt[i * TILE + b] = xb[s, c + i]
                wt[i * TILE + b] = imp[c0 + i]
        for i in range(16):
            for b in range(nb):
                v = xt[i * TILE + b]
                wt[i * TILE + b] = wt[i * TILE + b] * np.sqrt(sig[b] + v * v)
        sw = ws[0]
        for b in range(nb):
            sw[b] = _ZERO
        for i in range(16):
            for b in range(nb):
                sw[b] += wt[i * TILE + b]
        for b in range(nb):
            sw_out[s0 + b // 16, b % 16] = sw[b]
        _qx_tile(xt, wt, 16, nb, 4, scale, lev, ws)
        for b in range(nb):
            s = s0 + b // 16
            j = b % 16
            scales_out[s, j] = scale[b]
            for i in range(16):
                L_out[s, 16 * j + i] = lev[i * TILE + b]


@_jit()
def _iq4_sums(xt, wt, nb, idv, sx, s2):
    """Per tile block: sumqx = sum w*q*x, sumq2 = sum w*q*q, q = kvalues[best_index(id*x)], in order.
    (The level choice dominates here, so the plain element-outer loop is as fast as the 8-at-a-time one.)"""
    for b in range(nb):
        sx[b] = _ZERO
        s2[b] = _ZERO
    for i in range(32):
        for b in range(nb):
            v = xt[i * TILE + b]
            q = _iq4_level(idv[b] * v)
            wq = wt[i * TILE + b] * q
            sx[b] += wq * v
            s2[b] += wq * q


@_jit()
def _iq4_tile(xt, wt, nb, scale, ws):
    """The scale search of quantize_row_iq4_nl_impl (ntry = 7) for the first nb 32-blocks of the tile:
    scale (TILE,) is written, 0 for a block with max|x| < GROUP_MAX_EPS; ws is (6, TILE) float32 scratch."""
    amax, mx, idv, sx, s2, best = ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]
    _first_absmax(xt, 32, nb, amax, mx)
    for b in range(nb):
        if amax[b] < _EPS:
            mx[b] = _ONE
        d = -mx[b] / _IQ4_V0
        idv[b] = _ONE / d
    _iq4_sums(xt, wt, nb, idv, sx, s2)
    for b in range(nb):
        d = sx[b] / s2[b] if s2[b] > _ZERO else _ZERO
        scale[b] = d
        best[b] = d * sx[b]
    for itry in range(-7, 8):
        num = np.float32(itry - 127)
        for b in range(nb):
            idv[b] = num / mx[b]
        _iq4_sums(xt, wt, nb, idv, sx, s2)
        for b in range(nb):
            sqx = sx[b]
            sq2 = s2[b]
            if sq2 > _ZERO and sqx * sqx > best[b] * sq2:
                d = sqx / sq2
                scale[b] = d
                best[b] = d * sqx
    for b in range(nb):
        if amax[b] < _EPS:
            scale[b] = _ZERO


@_jit()
def _iq4_levels(xt, nb, idv, lev):
    """lev[i, b] = best_index_int8(16, kvalues_iq4nl, idv[b] * x[i, b]) for the first nb tile blocks."""
    for i in range(32):
        for b in range(nb):
            lev[i * TILE + b] = _iq4_index(idv[b] * xt[i * TILE + b])


@_jit()
def _pack_nibbles(lev, b, out, g, at):
    """out[g, at + j] = L[j] | L[16 + j] << 4 (j < 16) for the 32 levels of tile block b."""
    for j in range(16):
        out[g, at + j] = np.uint8(lev[j * TILE + b] | (lev[(j + 16) * TILE + b] << 4))


@_jit()
def _iq4_weights(xt, wt, nb, sig):
    """wt = qw * sqrt(sigma2 + x*x) in place (wt holds qw), sigma2 per tile block."""
    for i in range(32):
        for b in range(nb):
            v = xt[i * TILE + b]
            wt[i * TILE + b] = wt[i * TILE + b] * np.sqrt(sig[b] + v * v)


@_jit()
def _square_weights(xt, wt, n, nb):
    """wt = x*x (ggml's weights without an imatrix)."""
    for i in range(n):
        for b in range(nb):
            wt[i * TILE + b] = xt[i * TILE + b] * xt[i * TILE + b]


@_jit()
def iq4_nl(xb, imp, has_imp, d_out, out):
    """quantize_iq4_nl for 32-blocks xb (nb, 32), imp (n_per_row,): d_out (nb,) float32 (the fp32 scale,
    stored as fp16 by the caller) and the 16 nibble bytes out[:, 2:18]."""
    nblk = xb.shape[0]
    n_imp = imp.shape[0]
    xt = np.zeros(32 * TILE, dtype=np.float32)
    wt = np.zeros(32 * TILE, dtype=np.float32)
    lev = np.empty(32 * TILE, dtype=np.uint8)
    sig = np.empty(TILE, dtype=np.float32)
    scale = np.empty(TILE, dtype=np.float32)
    ws = np.empty((6, TILE), dtype=np.float32)
    f = np.float32(2.0) / np.float32(32.0)
    for g0 in range(0, nblk, TILE):
        nb = min(TILE, nblk - g0)
        for b in range(nb):
            for i in range(32):
                xt[i * TILE + b] = xb[g0 + b, i]
        if has_imp:
            for b in range(nb):
                c = (32 * (g0 + b)) % n_imp
                for i in range(32):
                    wt[i * TILE + b] = imp[c + i]
            for b in range(nb):
                sig[b] = _ZERO
            for i in range(32):
                for b in range(nb):
                    sig[b] += xt[i * TILE + b] * xt[i * TILE + b]
            for b in range(nb):
                sig[b] *= f
            _iq4_weights(xt, wt, nb, sig)
        else:
            _square_weights(xt, wt, 32, nb)
        _iq4_tile(xt, wt, nb, scale, ws)
        idv = ws[0]
        for b in range(nb):
            d = scale[b]
            d_out[g0 + b] = d
            idv[b] = _ONE / d if d != _ZERO else _ZERO
        _iq4_levels(xt, nb, idv, lev)
        for b in range(nb):
            _pack_nibbles(lev, b, out, g0 + b, 2)


@_jit()
def iq4_xs(xb, imp, has_imp, d_out, out):
    """quantize_iq4_xs for 256-super-blocks xb (nsb, 256), imp (n_per_row,): d_out (nsb,) float32 (stored
    as fp16 by the caller) and bytes out[:, 2:136] (scales_h, scales_l, qs)."""
    nsb = xb.shape[0]
    n_imp = imp.shape[0]
    per = TILE // 8  # super-blocks per tile
    xt = np.zeros(32 * TILE, dtype=np.float32)
    wt = np.zeros(32 * TILE, dtype=np.float32)
    lev = np.empty(32 * TILE, dtype=np.uint8)
    scale = np.empty(TILE, dtype=np.float32)
    sig = np.empty(TILE, dtype=np.float32)
    ls = np.empty(TILE, dtype=np.int32)
    ws = np.empty((6, TILE), dtype=np.float32)
    f = np.float32(2.0) / np.float32(256.0)
    for s0 in range(0, nsb, per):
        ns = min(per, nsb - s0)
        nb = 8 * ns
        for b in range(nb):
            s = s0 + b // 8
            c = 32 * (b % 8)
            for i in range(32):
                xt[i * TILE + b] = xb[s, c + i]
        if has_imp:
            for b in range(nb):
                c = (256 * (s0 + b // 8) + 32 * (b % 8)) % n_imp
                for i in range(32):
                    wt[i * TILE + b] = imp[c + i]
            for t in range(ns):  # sigma2 of each super-block: its 256 squares in order
                acc = _ZERO
                for j in range(256):
                    acc += xb[s0 + t, j] * xb[s0 + t, j]
                acc *= f
                for ib in range(8):
                    sig[8 * t + ib] = acc
            _iq4_weights(xt, wt, nb, sig)
        else:
            _square_weights(xt, wt, 32, nb)
        _iq4_tile(xt, wt, nb, scale, ws)
        idl = ws[0]
        for t in range(ns):
            amax = _ZERO
            mxs = _ZERO
            for ib in range(8):
                a = abs(scale[8 * t + ib])
                if a > amax:
                    amax = a
                    mxs = scale[8 * t + ib]
            d = -mxs / np.float32(32.0)
            d_out[s0 + t] = d
            idd = _ONE / d if d != _ZERO else _ZERO
            for ib in range(8):
                b = 8 * t + ib
                li = min(31, max(-32, _near(idd * scale[b])))
                ls[b] = li + 32
                dl = d * np.float32(li)
                idl[b] = _ONE / dl if dl != _ZERO else _ZERO
        _iq4_levels(xt, nb, idl, lev)
        for t in range(ns):
            s = s0 + t
            sh = 0
            for ib in range(8):
                b = 8 * t + ib
                _pack_nibbles(lev, b, out, s, 8 + 16 * ib)
                sh |= (ls[b] >> 4) << (2 * ib)
            for k in range(4):
                out[s, 4 + k] = np.uint8((ls[8 * t + 2 * k] & 0xF) | ((ls[8 * t + 2 * k + 1] & 0xF) << 4))
            out[s, 2] = np.uint8(sh & 0xFF)
            out[s, 3] = np.uint8(sh >> 8)


AVAILABLE = _numba is not None and not _FAILED


# ---- numpy-facing wrappers (same contracts as the numpy routines they replace)


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """symmetric_search.make_qx_quants, compiled: blocks x, w (n, M) -> (scale (M,), L (n, M) uint8).

    The kernel takes |iscale*x| <= nmax + 1 (rint as nearest_int), true for finite x; blocks with inf/NaN
    (only Q3_K's scale-of-scales search can see them) go to the numpy routine."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(w, dtype=F32)
    if not np.isfinite(x).all() or x.shape[0] % 8:
        return symmetric_search.make_qx_quants(x, nmax, w)
    scale = np.empty(x.shape[1], dtype=F32)
    L = np.empty(x.shape, dtype=np.uint8)
    qx_search(x, w, nmax, scale, L)
    return scale, L


def legacy_quantize(rows: np.ndarray, importance: np.ndarray, nmax: int) -> np.ndarray:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16) blocks (R*N/32, 18 or 22) of rows (R, N) with an imatrix, compiled."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    n_blocks = rows.size // 32
    d = np.empty(n_blocks, dtype=F32)
    out = np.empty((n_blocks, 18 if nmax == 8 else 22), dtype=np.uint8)
    legacy_impl(rows, np.ascontiguousarray(importance, dtype=F32), nmax, d, out)
    with np.errstate(over="ignore"):  # a huge scale is inf in fp16, as in ggml
        out[:, :2] = fp16_bits(d)
    return out


def self_check(quantize, n_per_row: int, with_plain: bool = True) -> bool:
    """True when quantize(rows, importance, fast=True) equals fast=False byte for byte on a small demo
    (8 heavy-tailed rows: an all-zero block, a -0.0 block, an outlier, a row whose squares overflow; with
    an imatrix that has zeros and, if with_plain, without one).  Called at import by each fast path's
    module; False on any exception."""
    if not AVAILABLE:
        return False
    try:
        rng = np.random.default_rng(0)
        rows = (rng.standard_t(2.5, (8, n_per_row)) * 0.02).astype(F32)
        rows[0, :32] = 0.0
        rows[1, 32:64] = -0.0
        rows[2, 5] = 3.0
        rows[3] *= F32(1e21)
        imp = rng.gamma(0.7, 1.0, n_per_row).astype(F32)
        imp[::17] = 0.0
        cases = [imp, None] if with_plain else [imp]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return all(np.array_equal(quantize(rows, w, fast=True), quantize(rows, w, fast=False)) for w in cases)
    except Exception:  # pragma: no cover - a broken numba install must not break quantization
        return False
