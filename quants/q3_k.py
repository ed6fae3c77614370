"""Q3_K: 256-weight super-blocks, 16 sub-blocks of 16 with 6-bit scales, 3-bit levels (ggml bit for bit).

Without an imatrix ggml uses quantize_row_q3_K_ref (make_q3_quants per sub-block, scales quantized
against the largest one); with one, quantize_row_q3_K_impl (weighted make_qx_quants for the levels and
again for the 16 scales).  Block layout (110 bytes): hmask[32], qs[64], scales[12], d fp16.
Both paths have an optional numba fast path (flags USE_NUMBA and USE_NUMBA_IMATRIX); numpy is the reference.
"""

from __future__ import annotations

import numpy as np

from quants import symmetric_numba
from quants.symmetric_search import (
    F32,
    blocks_T,
    chunks,
    first_absmax,
    fp16_bits,
    fp16_round,
    make_q3_quants,
    make_qx_quants,
    nearest_int,
    seq_sum,
    unit_importance,
)

QK_K = 256
BLOCK_BYTES = 110


def quantize_q3_k(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """float32 (n_rows, n_per_row) -> uint8 (n_rows, n_per_row/256*110), as ggml_quantize_chunk(Q3_K)."""
    return _quantize(rows, importance, fast=USE_NUMBA if importance is None else USE_NUMBA_IMATRIX)


def _quantize(rows: np.ndarray, importance: np.ndarray | None, *, fast: bool) -> np.ndarray:
    """quantize_q3_k with the compiled path for this importance case on (fast) or off (numpy reference)."""
    n_rows, n_per_row = rows.shape
    xb = rows.reshape(-1, QK_K)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ggml's inf/NaN paths, mirrored
        if fast and importance is not None:
            out = _impl_numba(np.ascontiguousarray(xb, dtype=F32), importance)
        else:
            out = np.empty((xb.shape[0], BLOCK_BYTES), dtype=np.uint8)
            for units in chunks(xb.shape[0], QK_K):
                if importance is None:
                    out[units] = _ref_blocks_numba(xb[units]) if fast else _ref_blocks(xb[units])
                else:
                    out[units] = _impl_blocks(xb[units], unit_importance(importance, QK_K, units))
    return out.reshape(n_rows, n_per_row // QK_K * BLOCK_BYTES)  # explicit: -1 is ambiguous for 0 rows


def _ref_blocks(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    x = blocks_T(xb, 16)
    scales, L = make_q3_quants(x, 4)
    scales = scales.reshape(nb, 16)
    _, max_scale = first_absmax(scales.T)
    nz = max_scale != 0
    iscale = F32(-32.0) / np.where(nz, max_scale, F32(1.0))
    li = nearest_int(iscale[:, None] * scales)
    li = ((li + 128) & 255) - 128  # C stores nearest_int into an int8_t before clamping
    ls = np.clip(li, -32, 31) + 32
    ls = np.where(nz[:, None], ls, 0)  # scales bytes stay memset to 0
    d_store = np.where(nz, F32(1.0) / iscale, F32(0.0))
    return _finish(x, L, ls, d_store)


def _impl_blocks(xb: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    x = blocks_T(xb, 16)
    xt = np.ascontiguousarray(xb.T)
    sigma2 = (F32(2.0) * seq_sum(xt * xt)) / F32(QK_K)
    w = blocks_T(qw, 16) * np.sqrt(np.repeat(sigma2, 16)[None, :] + x * x)
    sw = seq_sum(w)
    scales, L = make_qx_quants(x, 4, w)
    d_block, ls = make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32,
                                 np.ascontiguousarray(sw.reshape(nb, 16).T))
    return _finish(x, L, ls.T.astype(np.int32), d_block)


def _finish(x: np.ndarray, L: np.ndarray, ls: np.ndarray, d_store: np.ndarray) -> np.ndarray:
    """Requantize with the stored scales and pack.  x, L (16, nb*16); ls (nb, 16) in [0, 63]; d (nb,)."""
    nb = ls.shape[0]
    d = (fp16_round(d_store)[:, None] * (ls - 32).astype(F32)).reshape(-1)
    nz = d != 0
    lq = np.clip(nearest_int(x / np.where(nz, d, F32(1.0))), -4, 3) + 4
    L = np.where(nz, lq, L).astype(np.uint8)
    return _pack(L.T.reshape(nb, QK_K), ls, d_store)


def _pack(L: np.ndarray, ls: np.ndarray, d_store: np.ndarray) -> np.ndarray:
    """Block bytes from levels L (nb, 256) in [0, 7], 6-bit scales ls (nb, 16) and the fp32 super-scale."""
    nb = ls.shape[0]
    Ln = L.reshape(nb, 8, 32)  # element j -> (j // 32, j % 32)
    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    hm = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        hm |= (Ln[:, k] > 3).astype(np.uint8) << k
    out[:, :32] = hm
    L2 = (Ln & 3).reshape(nb, 2, 4, 32)
    out[:, 32:96].reshape(nb, 2, 32)[:] = L2[:, :, 0] | (L2[:, :, 1] << 2) | (L2[:, :, 2] << 4) | (L2[:, :, 3] << 6)
    ls = ls.astype(np.uint8)
    out[:, 96:104] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
    out[:, 104:108] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    out[:, 108:110] = fp16_bits(d_store)
    return out


# ---- optional numba fast paths (the numpy code above is the tested reference; test_quants_symmetric checks
# ---- both against libggml).  Same float32 operations, per block in order.  Without an imatrix: the kernels
# ---- below (flag USE_NUMBA); with one: symmetric_numba.q3k_levels + make_qx_quants, then _requant_pack
# ---- (flag USE_NUMBA_IMATRIX).

try:  # pragma: no cover - exercised when numba is installed
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None

USE_NUMBA = _numba is not None


_EPS = F32(1e-15)
_THR = F32(4194303.0)
_MAGIC = F32(12582912.0)
# nearest_int as the bit trick itself (exact for every float32, and it vectorises); a module global, not a
# closure variable, so that numba can cache the kernels that call it.
_near_bits = symmetric_numba._near

def _define_kernels() -> None:
    """Define the numba kernels (cache=True can fail on a read-only install: then numpy is used)."""
    global _near, _q3_levels, _requant_pack

    @_numba.njit(cache=True)
    def _near(v, scratch):
        """ggml nearest_int: rint in range; outside, the float bit trick's own answer."""
        if abs(v) <= _THR:
            return int(np.rint(v))
        scratch[0] = v + _MAGIC
        return int((scratch.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)

    @_numba.njit(cache=True)
    def _q3_levels(xb, L, scales, scratch):
        """make_q3_quants(16, 4, ..., do_rmse=true) for every 16-sub-block of the super-blocks xb."""
        nb = xb.shape[0]
        for b in range(nb):
            for j in range(16):
                amax = F32(0.0)
                mx = F32(0.0)
                for i in range(16):
                    v = xb[b, 16 * j + i]
                    if abs(v) > amax:
                        amax = abs(v)
                        mx = v
                if amax < _EPS:
                    for i in range(16):
                        L[b, 16 * j + i] = 0  # C returns before adding nmax
                    scales[b, j] = F32(0.0)
                    continue
                iscale = F32(-4.0) / mx
                sumlx = F32(0.0)
                suml2 = F32(0.0)
                for i in range(16):
                    v = xb[b, 16 * j + i]
                    li = min(3, max(-4, _near(iscale * v, scratch)))
                    L[b, 16 * j + i] = li
                    w = v * v
                    fl = F32(li)
                    sumlx += w * v * fl
                    suml2 += w * fl * fl
                for _ in range(5):
                    n_changed = 0
                    for i in range(16):
                        v = xb[b, 16 * j + i]
                        w = v * v
                        fL = F32(L[b, 16 * j + i])
                        slx = sumlx - w * v * fL
                        if slx > 0:
                            sl2 = suml2 - w * fL * fL
                            nl = min(3, max(-4, _near(v * sl2 / slx, scratch)))
                            if nl != L[b, 16 * j + i]:
                                fn = F32(nl)
                                slx += w * v * fn
                                sl2 += w * fn * fn
                                if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                                    L[b, 16 * j + i] = nl
                                    sumlx = slx
                                    suml2 = sl2
                                    n_changed += 1
                    if n_changed == 0:
                        break
                for i in range(16):
                    L[b, 16 * j + i] += 4
                scales[b, j] = sumlx / suml2 if suml2 > 0 else F32(0.0)

    @_numba.njit(cache=True, nogil=True, error_model="numpy")
    def _requant_pack(xb, L, ls, dq, out):
        """L = clamp(nearest_int(x/d), -4, 3) + 4 where d = dq * (ls - 32) is non-zero (C: `if (!d) continue`,
        so NaN requantizes), then the block bytes but d: hmask, qs, the 12 scale bytes (out[:, :108]).
        L (nb, 256) uint8 levels in [0, 7], updated; ls (nb, 16) int32 in [0, 63]; dq (nb,) the fp16-rounded d.

        Written as straight loops over a super-block's 256 elements (d spread per element, a select for
        d == 0) because LLVM vectorises those, not the 16-element inner loops."""
        nb = xb.shape[0]
        dfull = np.empty(QK_K, dtype=F32)
        hm = np.empty(32, dtype=np.uint8)
        for s in range(nb):
            for j in range(16):
                d = dq[s] * F32(ls[s, j] - 32)
                for i in range(16):
                    dfull[16 * j + i] = d
            xs = xb[s]
            Ls = L[s]
            os = out[s]
            for e in range(QK_K):
                d = dfull[e]
                li = np.uint8(min(3, max(-4, _near_bits(xs[e] / d))) + 4)
                Ls[e] = li if d != 0 else Ls[e]
            for m in range(32):
                hm[m] = 0
            for k in range(8):  # element j's high bit (L > 3) goes to hmask[j % 32], bit j // 32
                for m in range(32):
                    hm[m] |= (Ls[32 * k + m] >> 2) << k
            for m in range(32):
                os[m] = hm[m]
            for half in range(2):
                for m in range(32):
                    e = 128 * half + m
                    os[32 + 32 * half + m] = ((Ls[e] & 3) | ((Ls[e + 32] & 3) << 2)
                                              | ((Ls[e + 64] & 3) << 4) | ((Ls[e + 96] & 3) << 6))
            for j in range(8):
                os[96 + j] = np.uint8((ls[s, j] & 0xF) | ((ls[s, j + 8] & 0xF) << 4))
            for k in range(4):
                os[104 + k] = np.uint8((ls[s, k] >> 4) | ((ls[s, 4 + k] >> 4) << 2)
                                       | ((ls[s, 8 + k] >> 4) << 4) | ((ls[s, 12 + k] >> 4) << 6))


def _ref_blocks_numba(xb: np.ndarray) -> np.ndarray:
    """_ref_blocks with the per-element loops compiled (identical bytes)."""
    nb = xb.shape[0]
    scratch = np.zeros(1, dtype=F32)
    L = np.empty((nb, QK_K), dtype=np.int8)
    scales = np.empty((nb, 16), dtype=F32)
    _q3_levels(xb, L, scales, scratch)
    _, max_scale = first_absmax(scales.T)
    nz = max_scale != 0
    iscale = F32(-32.0) / np.where(nz, max_scale, F32(1.0))
    li = nearest_int(iscale[:, None] * scales)
    li = ((li + 128) & 255) - 128
    ls = np.where(nz[:, None], np.clip(li, -32, 31) + 32, 0).astype(np.int32)
    d_store = np.where(nz, F32(1.0) / iscale, F32(0.0))
    return _finish_numba(xb, L.view(np.uint8), ls, d_store)


def _impl_numba(xb: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """_impl_blocks over all super-blocks xb (nb, 256) with the compiled searches (identical bytes)."""
    nb = xb.shape[0]
    scales = np.empty((nb, 16), dtype=F32)
    sw = np.empty((nb, 16), dtype=F32)
    L = np.empty((nb, QK_K), dtype=np.uint8)
    symmetric_numba.q3k_levels(xb, np.ascontiguousarray(importance, dtype=F32), scales, sw, L)
    d_block, ls = _scale_of_scales(scales, sw)
    return _finish_numba(xb, L, ls, d_block)


def _finish_numba(xb: np.ndarray, L: np.ndarray, ls: np.ndarray, d_store: np.ndarray) -> np.ndarray:
    """_finish compiled: requantize with the stored scales and pack.  L (nb, 256) uint8 in [0, 7] (updated),
    ls (nb, 16) int32 in [0, 63], d_store (nb,) the fp32 super-scale."""
    out = np.empty((xb.shape[0], BLOCK_BYTES), dtype=np.uint8)
    _requant_pack(xb, L, ls, fp16_round(d_store), out)
    out[:, 108:110] = fp16_bits(d_store)
    return out


def _scale_of_scales(scales: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, 32, scales, Ls, 1, sw) per super-block -> (d (nb,), Ls (nb, 16) int32).

    The compiled search needs finite input; super-blocks whose scales overflowed (inf/NaN, from huge
    weights) take the numpy routine, so one such block does not send the whole tensor there."""
    st = np.ascontiguousarray(scales.T)
    wt = np.ascontiguousarray(sw.T)
    ok = np.isfinite(scales).all(axis=1)
    if ok.all():
        d, ls = symmetric_numba.make_qx_quants(st, 32, wt)
    else:
        d = np.empty(scales.shape[0], dtype=F32)
        ls = np.empty(st.shape, dtype=np.uint8)
        d[ok], ls[:, ok] = symmetric_numba.make_qx_quants(st[:, ok], 32, wt[:, ok])
        d[~ok], ls[:, ~ok] = make_qx_quants(st[:, ~ok], 32, wt[:, ~ok])
    return d, np.ascontiguousarray(ls.T, dtype=np.int32)


def _warm_up() -> bool:
    """Compile (or load from numba's cache) now, at import, not inside the first timed call; on any
    numba failure fall back to numpy."""
    try:
        demo = np.linspace(-1.0, 1.0, 2 * QK_K, dtype=F32).reshape(2, QK_K)
        return bool((_ref_blocks_numba(demo) == _ref_blocks(demo)).all())
    except Exception:  # pragma: no cover - a broken numba install must not break quantization
        return False


if USE_NUMBA:
    try:
        _define_kernels()
        USE_NUMBA = _warm_up()
    except Exception:  # pragma: no cover
        USE_NUMBA = False

# The imatrix fast path (symmetric_numba.q3k_levels + the kernels above), checked against numpy at import.
USE_NUMBA_IMATRIX = symmetric_numba.self_check(_quantize, 512, with_plain=False)
