"""Q3_K: 256-weight super-blocks, 16 sub-blocks of 16 with 6-bit scales, 3-bit levels (ggml bit for bit).

Without an imatrix ggml uses quantize_row_q3_K_ref (make_q3_quants per sub-block, scales quantized
against the largest one); with one, quantize_row_q3_K_impl (weighted make_qx_quants for the levels and
again for the 16 scales).  Block layout (110 bytes): hmask[32], qs[64], scales[12], d fp16.
"""

from __future__ import annotations

import numpy as np

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
    n_rows = rows.shape[0]
    xb = rows.reshape(-1, QK_K)
    out = np.empty((xb.shape[0], BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for units in chunks(xb.shape[0], QK_K):
            if importance is None:
                out[units] = _ref_blocks_numba(xb[units]) if USE_NUMBA else _ref_blocks(xb[units])
            else:
                out[units] = _impl_blocks(xb[units], unit_importance(importance, QK_K, units))
    return out.reshape(n_rows, -1)


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


# ---- optional numba fast path for the no-imatrix path (the numpy code above is the tested reference;
# ---- test_quants_symmetric checks both against libggml).  Same float32 operations, per block in order.

try:  # pragma: no cover - exercised when numba is installed
    import numba as _numba
except ImportError:  # pragma: no cover
    _numba = None

USE_NUMBA = _numba is not None


_EPS = F32(1e-15)
_THR = F32(4194303.0)
_MAGIC = F32(12582912.0)

def _define_kernels() -> None:
    """Define the numba kernels (cache=True can fail on a read-only install: then numpy is used)."""
    global _near, _q3_levels, _requant

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

    @_numba.njit(cache=True)
    def _requant(xb, L, ls, dq, scratch):
        """L = nearest_int(x/d) clamped to [-4, 3] + 4 where d = fp16(d) * (ls - 32) is non-zero."""
        nb = xb.shape[0]
        for b in range(nb):
            for j in range(16):
                d = dq[b] * F32(ls[b, j] - 32)
                if d == 0:
                    continue
                for i in range(16):
                    L[b, 16 * j + i] = min(3, max(-4, _near(xb[b, 16 * j + i] / d, scratch))) + 4


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
    _requant(xb, L, ls, fp16_round(d_store), scratch)
    return _pack(L.view(np.uint8), ls, d_store)


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
