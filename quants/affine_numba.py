"""Optional numba kernels for the affine searches of affine_search.py (same float32 ops, same order).

The numpy routines in affine_search.py are the readable, tested reference; these kernels compute the same
bytes faster.  Each SIMD lane is one block: the kernels work on tiles of _T blocks, and the block index is
the innermost loop, so LLVM vectorises without reordering any per-block sum (each lane still adds its terms
in element order).  No fastmath: no FMA contraction, no reassociation (libggml-base is built the same way).

Layout: everything a tile needs lives in one float32 scratch vector at compile-time-constant offsets
(element i of lane b of a (n, _T) tile at i * _T + b).  With one base pointer and constant distances LLVM
can prove that the stores of a loop do not overlap its loads; with several arrays it would need run-time
alias checks and gives up vectorising.  For the same reason element loops run to the constant _NMAX and
break at n: a bounded index keeps the address ranges provable.

Importing this module compiles (or loads from numba's cache) the kernels and checks them against the numpy
path on a small demo; `AVAILABLE` is False when numba is missing or anything fails, and callers use numpy.
"""

from __future__ import annotations

import warnings

import numpy as np

from quants import affine_search as ref
from quants.affine_search import F32, fp16_round

_MAGIC = F32(12582912.0)  # 1.5 * 2**23, ggml's nearest_int constant
_MANT = np.int32(0x007FFFFF)
_HALF = F32(4194304.0)  # 0x00400000
_EPS = F32(1e-15)  # GROUP_MAX_EPS
_FLT_MAX = F32(np.finfo(np.float32).max)
_T = 64  # blocks (SIMD lanes) per tile: x, w, level tiles and lane vectors (28 KiB) stay in L1
_NMAX = 32  # largest block length
# scratch offsets: x, w and level tiles (_NMAX * _T each), then per-lane vectors (_T each)
_X = 0
_W = _X + _NMAX * _T
_LA = _W + _NMAX * _T
_V = _LA + _NMAX * _T
(_XMN, _XMX, _SW, _SX, _MN, _ISC, _SCL, _BEST, _LISC, _LMN, _SL, _SL2, _SXL, _TS, _TM, _ERR, _OK) = (
    _V + k * _T for k in range(17))
_SIZE = _V + 17 * _T

try:  # pragma: no cover - exercised when numba is installed
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None


def _define_kernels() -> None:
    """Define the kernels (a function, so that a missing or broken numba only disables the fast path)."""
    # module globals, not closures: kernels that call each other through closure cells miss numba's cache
    global _near, _u8, _level, _levels_pass, _error_pass, _tile
    global qkx_search, qp_search, row_sums, requantize_rows, legacy_ref_blocks

    opts = {"cache": True, "nogil": True, "error_model": "numpy"}

    @_numba.njit(inline="always", **opts)
    def _near(v):
        """ggml's nearest_int(v) as a float32 (exact: |result| <= 2**22)."""
        return np.float32(np.float32(v + _MAGIC).view(np.int32) & _MANT) - _HALF

    @_numba.njit(inline="always", **opts)
    def _u8(fl):
        """What C keeps of an int stored into a uint8_t (the low byte), for a float32 holding an int."""
        return np.float32(np.int32(fl) & np.int32(0xFF))

    @_numba.njit(inline="always", **opts)
    def _level(v, fnmax):
        """MAX(0, MIN(nmax, nearest_int(v))) as float32 with ggml's bit trick (exact for every v)."""
        fl = _near(v)
        fl = F32(0.0) if fl < F32(0.0) else fl
        return fnmax if fl > fnmax else fl

    @_numba.njit(**opts)
    def _levels_pass(S, n, fnmax):
        """Levels of every element for (S[_ISC], S[_MN]) into the _LA tile, and their weighted sums."""
        for b in range(_T):
            S[_SL + b] = F32(0.0)
            S[_SL2 + b] = F32(0.0)
            S[_SXL + b] = F32(0.0)
        for i in range(_NMAX):
            if i == n:
                break
            for b in range(_T):
                v = S[_X + i * _T + b]
                fl = _level(S[_ISC + b] * (v - S[_MN + b]), fnmax)
                S[_LA + i * _T + b] = fl
                wl = S[_W + i * _T + b] * fl
                S[_SL + b] += wl
                S[_SL2 + b] += wl * fl
                S[_SXL + b] += wl * v

    @_numba.njit(**opts)
    def _error_pass(S, n, use_mad, scale_at, min_at, out_at):
        """S[out_at + b] = sum_i w * (|d| or d*d), d = scale * level + min - x (C's order of operations)."""
        for b in range(_T):
            S[out_at + b] = F32(0.0)
        for i in range(_NMAX):
            if i == n:
                break
            if use_mad:
                for b in range(_T):
                    diff = S[scale_at + b] * S[_LA + i * _T + b] + S[min_at + b] - S[_X + i * _T + b]
                    S[out_at + b] += S[_W + i * _T + b] * abs(diff)
            else:
                for b in range(_T):
                    diff = S[scale_at + b] * S[_LA + i * _T + b] + S[min_at + b] - S[_X + i * _T + b]
                    S[out_at + b] += S[_W + i * _T + b] * (diff * diff)

    @_numba.njit(**opts)
    def _tile(S, n, fnmax, rmin, rdelta, nstep, use_mad):
        """make_qkx2/3_quants for the _T blocks of a loaded tile; leaves the winning (iscale, min) in
        S[_LISC], S[_LMN], the scale in S[_SCL] and the final min in S[_MN]."""
        for b in range(_T):
            v = S[_X + b]
            ww = S[_W + b]
            S[_XMN + b] = v
            S[_XMX + b] = v
            S[_SW + b] = ww
            S[_SX + b] = ww * v
        for i in range(1, _NMAX):
            if i == n:
                break
            for b in range(_T):
                v = S[_X + i * _T + b]
                ww = S[_W + i * _T + b]
                m0 = S[_XMN + b]
                S[_XMN + b] = v if v < m0 else m0
                m1 = S[_XMX + b]
                S[_XMX + b] = v if v > m1 else m1
                S[_SW + b] += ww
                S[_SX + b] += ww * v
        for b in range(_T):
            m = S[_XMN + b]
            m = F32(0.0) if m > F32(0.0) else m
            iscale = fnmax / (S[_XMX + b] - m)
            S[_MN + b] = m
            S[_ISC + b] = iscale
            S[_LISC + b] = iscale
            S[_LMN + b] = m
            S[_SCL + b] = F32(1.0) / iscale
        _levels_pass(S, n, fnmax)
        _error_pass(S, n, use_mad, _SCL, _MN, _BEST)
        if nstep < 1:
            return
        for step in range(nstep + 1):
            num = (rmin + rdelta * np.float32(step)) + fnmax
            for b in range(_T):
                S[_ISC + b] = num / (S[_XMX + b] - S[_MN + b])
            _levels_pass(S, n, fnmax)
            for b in range(_T):
                sw, sx, sl, sl2, sxl = S[_SW + b], S[_SX + b], S[_SL + b], S[_SL2 + b], S[_SXL + b]
                D = sw * sl2 - sl * sl
                this_scale = (sw * sxl - sx * sl) / D
                this_min = (sl2 * sx - sl * sxl) / D
                if this_min > F32(0.0):
                    this_min = F32(0.0)
                    this_scale = sxl / sl2
                S[_TS + b] = this_scale
                S[_TM + b] = this_min
                S[_OK + b] = F32(1.0) if D > F32(0.0) else F32(0.0)
            _error_pass(S, n, use_mad, _TS, _TM, _ERR)
            for b in range(_T):
                if S[_OK + b] != F32(0.0) and S[_ERR + b] < S[_BEST + b]:
                    S[_BEST + b] = S[_ERR + b]
                    S[_SCL + b] = S[_TS + b]
                    S[_LISC + b] = S[_ISC + b]
                    S[_LMN + b] = S[_MN + b]
                    S[_MN + b] = S[_TM + b]

    @_numba.njit(**opts)
    def qkx_search(x, w, nmax, rmin, rdelta, nstep, use_mad, scale_out, min_out, L_out):
        """make_qkx2_quants / make_qkx3_quants (weights given) for blocks x, w (n, M) -> scale_out, min_out
        (M,) (the_min: minus the offset) and L_out (n, M) uint8, as affine_search.make_qkx."""
        n, M = x.shape
        fnmax = np.float32(nmax)
        S = np.zeros(_SIZE, dtype=np.float32)
        for b0 in range(0, M, _T):
            t = min(_T, M - b0)
            for i in range(n):
                for b in range(t):
                    S[_X + i * _T + b] = x[i, b0 + b]
                    S[_W + i * _T + b] = w[i, b0 + b]
                for b in range(t, _T):  # a partial last tile: spare lanes compute garbage, never read
                    S[_X + i * _T + b] = F32(0.0)
                    S[_W + i * _T + b] = F32(0.0)
            _tile(S, n, fnmax, rmin, rdelta, nstep, use_mad)
            for b in range(_T):  # the levels of the winning step (of the first pass when none won)
                S[_ISC + b] = S[_LISC + b]
                S[_TM + b] = S[_MN + b]
                S[_MN + b] = S[_LMN + b]
            _levels_pass(S, n, fnmax)
            for b in range(t):
                m = S[_XMN + b]
                m = F32(0.0) if m > F32(0.0) else m
                if S[_XMX + b] == m:  # flat block: levels 0, scale 0, the_min = -min
                    scale_out[b0 + b] = F32(0.0)
                    min_out[b0 + b] = -m
                    for i in range(n):
                        S[_LA + i * _T + b] = F32(0.0)
                else:
                    scale_out[b0 + b] = S[_SCL + b]
                    min_out[b0 + b] = -S[_TM + b]
            for i in range(n):
                for b in range(t):
                    L_out[i, b0 + b] = np.uint8(S[_LA + i * _T + b])

    @_numba.njit(**opts)
    def qp_search(x, qw, nmax, out, L):
        """make_qp_quants for the blocks x, qw (n, M) -> out (M,) scales and L (n, M) uint8, _T blocks at a
        time.  The C refinement stops after a pass without change; such a pass changes nothing, so every
        lane runs all 5 passes (with selects instead of branches) and ends in the same state."""
        n, M = x.shape
        fnmax = np.float32(nmax)
        S = np.zeros(_SIZE, dtype=np.float32)
        for b0 in range(0, M, _T):
            t = min(_T, M - b0)
            for i in range(n):
                for b in range(t):
                    S[_X + i * _T + b] = x[i, b0 + b]
                    S[_W + i * _T + b] = qw[i, b0 + b]
                for b in range(t, _T):
                    S[_X + i * _T + b] = F32(0.0)
                    S[_W + i * _T + b] = F32(0.0)
            for b in range(_T):
                S[_XMX + b] = F32(0.0)
            for i in range(_NMAX):
                if i == n:
                    break
                for b in range(_T):
                    v = S[_X + i * _T + b]
                    m = S[_XMX + b]
                    S[_XMX + b] = m if m > v else v
            for b in range(_T):
                iscale = fnmax / S[_XMX + b]
                S[_ISC + b] = iscale
                S[_SCL + b] = F32(1.0) / iscale
                S[_BEST + b] = F32(0.0)
            for i in range(_NMAX):
                if i == n:
                    break
                for b in range(_T):
                    v = S[_X + i * _T + b]
                    diff = v - S[_SCL + b] * _u8(_near(S[_ISC + b] * v))
                    S[_BEST + b] += S[_W + i * _T + b] * diff * diff
            for step in range(-4, 5):
                if step == 0:
                    continue
                num = F32(0.1) * np.float32(step) + fnmax
                for b in range(_T):
                    iscale_is = num / S[_XMX + b]
                    S[_TS + b] = iscale_is
                    S[_TM + b] = F32(1.0) / iscale_is
                    S[_ERR + b] = F32(0.0)
                for i in range(_NMAX):
                    if i == n:
                        break
                    for b in range(_T):
                        v = S[_X + i * _T + b]
                        li = min(fnmax, _near(S[_TS + b] * v))
                        diff = v - S[_TM + b] * li
                        S[_ERR + b] += S[_W + i * _T + b] * diff * diff
                for b in range(_T):
                    better = S[_ERR + b] < S[_BEST + b]
                    S[_BEST + b] = S[_ERR + b] if better else S[_BEST + b]
                    S[_ISC + b] = S[_TS + b] if better else S[_ISC + b]
            for b in range(_T):
                S[_SL + b] = F32(0.0)
                S[_SL2 + b] = F32(0.0)
            for i in range(_NMAX):
                if i == n:
                    break
                for b in range(_T):
                    v = S[_X + i * _T + b]
                    w = S[_W + i * _T + b]
                    li = min(fnmax, _near(S[_ISC + b] * v))
                    S[_LA + i * _T + b] = _u8(li)
                    S[_SL + b] += w * v * li
                    S[_SL2 + b] += w * li * li
            for _ in range(5):
                for i in range(_NMAX):
                    if i == n:
                        break
                    for b in range(_T):
                        v = S[_X + i * _T + b]
                        w = S[_W + i * _T + b]
                        fL = S[_LA + i * _T + b]
                        sumlx = S[_SL + b]
                        suml2 = S[_SL2 + b]
                        slx = sumlx - w * v * fL
                        sl2 = suml2 - w * fL * fL
                        new_l = min(fnmax, _near(v * sl2 / slx))
                        slx_n = slx + w * v * new_l
                        sl2_n = sl2 + w * new_l * new_l
                        take = ((slx > F32(0.0)) & (sl2 > F32(0.0)) & (new_l != fL)
                                & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n))
                        S[_LA + i * _T + b] = _u8(new_l) if take else fL
                        S[_SL + b] = slx_n if take else sumlx
                        S[_SL2 + b] = sl2_n if take else suml2
            for b in range(t):
                if S[_XMX + b] < _EPS:  # all zero (C returns before searching)
                    out[b0 + b] = F32(0.0)
                    for i in range(n):
                        L[i, b0 + b] = 0
                else:
                    suml2 = S[_SL2 + b]
                    out[b0 + b] = S[_SL + b] / suml2 if suml2 > F32(0.0) else F32(0.0)
                    for i in range(n):
                        L[i, b0 + b] = np.uint8(S[_LA + i * _T + b])

    @_numba.njit(**opts)
    def legacy_ref_blocks(x, nmax, d_out, m_out, L):
        """quantize_row_q4_1_ref (nmax 15) / q5_1_ref (nmax 31) for blocks as rows x (M, 32) -> d_out, m_out
        (M,) before the fp16 rounding and L (M, 32) uint8 as C stores them before packing."""
        M, n = x.shape
        fnmax = np.float32(nmax)
        for r in range(M):
            mn = _FLT_MAX
            mx = -_FLT_MAX
            for i in range(n):
                v = x[r, i]
                mn = v if v < mn else mn
                mx = v if v > mx else mx
            d = (mx - mn) / fnmax
            ident = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            d_out[r] = d
            m_out[r] = mn
            for i in range(n):
                v = (x[r, i] - mn) * ident + F32(0.5)
                # x86 float -> int32 truncation (INT_MIN when out of range or NaN), then the low byte
                ok = (v > F32(-2147483648.0)) & (v < F32(2147483648.0))
                vi = v if ok else F32(0.0)
                byte = (np.int32(vi) & 0xFF) if ok else 0
                if nmax == 15:  # MIN(15, (int8_t)v), stored as uint8
                    byte = min(15, byte - 256 if byte >= 128 else byte) & 0xFF
                L[r, i] = np.uint8(byte)

    @_numba.njit(**opts)
    def row_sums(x, square, out):
        """out[r] = C `s = 0; for: s += t` over row r of x (M, n), t = x*x or x, in element order."""
        M, n = x.shape
        for r in range(M):
            acc = F32(0.0)
            if square:
                for i in range(n):
                    acc += x[r, i] * x[r, i]
            else:
                for i in range(n):
                    acc += x[r, i]
            out[r] = acc

    @_numba.njit(**opts)
    def requantize_rows(x, d, dm, L, nmax):
        """In place, like affine_search.requantize on rows: L[r] = clamp(nearest_int((x + dm) / d)) if d != 0."""
        M, n = x.shape
        fnmax = np.float32(nmax)
        for r in range(M):
            dr = d[r]
            if dr == F32(0.0):
                continue
            mr = dm[r]
            for i in range(n):
                L[r, i] = np.uint8(_level((x[r, i] + mr) / dr, fnmax))


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """affine_search.make_qkx, compiled: blocks x, w (n, M) -> (scale (M,), the_min (M,), L (n, M) uint8)."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = np.ascontiguousarray(w, dtype=F32)
    n, M = x.shape
    if n > _NMAX:
        raise ValueError(f"blocks of {n} > {_NMAX} elements")
    scale = np.empty(M, dtype=F32)
    the_min = np.empty(M, dtype=F32)
    L = np.empty((n, M), dtype=np.uint8)
    if M:
        qkx_search(x, w, nmax, F32(rmin), F32(rdelta), nstep, bool(use_mad), scale, the_min, L)
    return scale, the_min, L


def make_qp(x: np.ndarray, qw: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """affine_search.make_qp, compiled: x, qw (n, M) -> (scale (M,), L (n, M) uint8)."""
    x = np.ascontiguousarray(x, dtype=F32)
    qw = np.ascontiguousarray(qw, dtype=F32)
    out = np.empty(x.shape[1], dtype=F32)
    L = np.empty(x.shape, dtype=np.uint8)
    qp_search(x, qw, nmax, out, L)
    return out, L


def make_qkx_rows(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                  use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx for blocks stored as rows x, w (M, n) (no transposed copies) -> L (M, n)."""
    M, n = x.shape
    scale = np.empty(M, dtype=F32)
    the_min = np.empty(M, dtype=F32)
    L = np.empty((M, n), dtype=np.uint8)
    if M:  # the kernel reads the (n, M) views, which numba compiles for strided (F-ordered) arrays
        qkx_search(x.T, w.T, nmax, F32(rmin), F32(rdelta), nstep, bool(use_mad), scale, the_min, L.T)
    return scale, the_min, L


def seq_row_sums(x: np.ndarray, square: bool) -> np.ndarray:
    """C `s = 0; for: s += x[i]*x[i]` (or `+= x[i]`) along each row of x (M, n), in order."""
    out = np.empty(x.shape[0], dtype=F32)
    row_sums(np.ascontiguousarray(x, dtype=F32), bool(square), out)
    return out


def requantized(x: np.ndarray, d: np.ndarray, dm: np.ndarray, L: np.ndarray, nmax: int) -> np.ndarray:
    """affine_search.requantize for blocks as rows x, L (M, n); d, dm (M,).  Updates and returns L."""
    requantize_rows(x, np.ascontiguousarray(d, dtype=F32), np.ascontiguousarray(dm, dtype=F32), L, nmax)
    return L


def legacy_affine_ref(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """affine_search.legacy_affine_ref (Q4_1/Q5_1 without importance), compiled: blocks (M, 32) ->
    (d, m fp16-rounded (M,), L (M, 32) uint8)."""
    x = np.ascontiguousarray(blocks, dtype=F32)
    d = np.empty(x.shape[0], dtype=F32)
    m = np.empty(x.shape[0], dtype=F32)
    L = np.empty(x.shape, dtype=np.uint8)
    legacy_ref_blocks(x, nmax, d, m, L)
    return fp16_round(d), fp16_round(m), L


def legacy_affine_levels(rows: np.ndarray, importance: np.ndarray, nmax: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """affine_search.legacy_affine_levels (Q4_1/Q5_1 with importance) with the compiled search."""
    n_per_row = rows.shape[1]
    rows = np.ascontiguousarray(rows, dtype=F32)
    sigma2 = seq_row_sums(rows, True) / F32(n_per_row)
    w = np.asarray(importance, dtype=F32)[None, :] * np.sqrt(sigma2[:, None] + rows * rows)
    scale, the_min, L = make_qkx_rows(rows.reshape(-1, 32), w.reshape(-1, 32), nmax, -0.9, 0.05, 36, False)
    return fp16_round(scale), fp16_round(-the_min), L


def k4_levels(xb: np.ndarray, qw: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int],
              clamp_qp_levels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """affine_search.k4_levels (Q4_K/Q5_K) with the compiled searches, sub-blocks as rows."""
    nB = xb.shape[0]
    xb = np.ascontiguousarray(xb, dtype=F32)
    xs = xb.reshape(-1, 32)  # row b * 8 + j: sub-block j of super-block b
    if qw is None:
        av_x = np.sqrt(seq_row_sums(xs, True) / F32(32))
        w = av_x[:, None] + np.abs(xs)
        rmin, rdelta, nstep = ref_search
        scale, the_min, L = make_qkx_rows(xs, w, nmax, rmin, rdelta, nstep, False)
        sw = None
    else:
        sigma2 = F32(2.0) * seq_row_sums(xb, True) / F32(256)
        w = np.asarray(qw, dtype=F32).reshape(-1, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + xs * xs)
        sw = seq_row_sums(w, False)
        scale, the_min, L = make_qkx_rows(xs, w, nmax, -0.9, 0.05, 36, False)
    d, dmin, sc, dd, dm = ref.k4_scales(scale, the_min, sw, clamp_qp_levels, qp=make_qp)
    return d, dmin, sc, requantized(xs, dd, dm, L, nmax).reshape(nB, 256)


def q2k_levels(xb: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """affine_search.q2k_levels (Q2_K) with the compiled searches, sub-blocks as rows."""
    nB = xb.shape[0]
    xb = np.ascontiguousarray(xb, dtype=F32)
    xs = xb.reshape(-1, 16)  # row b * 16 + j: sub-block j of super-block b
    if qw is None:
        scale, the_min, L = make_qkx_rows(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        sw = None
    else:
        sigma2 = seq_row_sums(xb, True) / F32(256)
        w = np.asarray(qw, dtype=F32).reshape(-1, 16) * np.sqrt(np.repeat(sigma2, 16)[:, None] + xs * xs)
        sw = seq_row_sums(w, False)
        scale, the_min, L = make_qkx_rows(xs, w, 3, -0.9, 0.05, 36, False)
    d, dmin, sc, dd, dm = ref.q2k_scales(scale, the_min, sw, qp=make_qp)
    return d, dmin, sc, requantized(xs, dd, dm, L, 3).reshape(nB, 256)


def _check() -> bool:
    """Compile every kernel now (or load it from numba's cache), not inside the first timed call, and
    compare each compiled driver with its numpy reference on a small demo (signed zeros, a zero block)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(F32)
    x[1, :64] = 0.0
    x[2, 3::5] = -0.0
    imp = rng.gamma(0.7, 1.0, 512).astype(F32)
    qw = np.broadcast_to(imp, x.shape).reshape(-1, 256)
    xb = x.reshape(-1, 256)
    pairs = [(legacy_affine_levels(x, imp, 15), ref.legacy_affine_levels(x, imp, 15)),
             (legacy_affine_ref(x.reshape(-1, 32), 15), ref.legacy_affine_ref(x.reshape(-1, 32), 15)),
             (legacy_affine_ref(x.reshape(-1, 32), 31), ref.legacy_affine_ref(x.reshape(-1, 32), 31)),
             (q2k_levels(xb, None), ref.q2k_levels(xb, None)), (q2k_levels(xb, qw), ref.q2k_levels(xb, qw))]
    for qwb in (None, qw):
        args = (xb, qwb, 31, (-0.5, 0.1, 15), True)
        pairs.append((k4_levels(*args), ref.k4_levels(*args)))
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)
    args = (xs, np.abs(xs), 15, -1.0, 0.1, 20, False)
    pairs.append((make_qkx(*args), ref.make_qkx(*args)))
    return all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
               for got, want in pairs for a, b in zip(got, want, strict=True))


AVAILABLE = False  # the kernels compiled and passed the self-check
if _numba is not None:  # pragma: no branch
    try:
        _define_kernels()
        AVAILABLE = _check()
    except Exception:  # pragma: no cover - a broken numba install must not break quantization
        AVAILABLE = False
    if not AVAILABLE:  # pragma: no cover
        warnings.warn("quants.affine_numba: the numba kernels failed their self-check; Q4_1/Q5_1/Q2_K/Q4_K/Q5_K "
                      "use the (slower) numpy path", RuntimeWarning, stacklevel=2)
USE_NUMBA = AVAILABLE  # the switch the quantizers read on every call (tests turn it off to compare)
