"""`quants.polish`: after the compensated walk, coordinate descent on the codes, a least-squares refit of the
32-blocks' fp16 scales and a refit / descent of the K-quants' integer sub-block scales lower the output error
under H, row by row, in bytes ggml decodes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import quants
import quants.polish as qp
from quants import levels
from quants.compensate import quantize_compensated

K = 512
ALL_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]
REFIT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
K_REFIT = [T.Q4_K, T.Q5_K, T.Q6_K]


def _weights(rows: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)


@pytest.fixture(scope="module")
def hessian() -> np.ndarray:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4096, K)) @ (rng.standard_normal((K, K)) / np.sqrt(K))
    return x.T @ x / x.shape[0]


def _walk_and_polish(w, qtype, hessian):
    walked = quantize_compensated(w, qtype, None, hessian, do_polish=False)
    polished = quantize_compensated(w, qtype, None, hessian)
    return walked, polished


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_polish_lowers_every_rows_loss(qtype, hessian):
    w = _weights(seed=3)
    walked, polished = _walk_and_polish(w, qtype, hessian)
    assert polished.shape == walked.shape and polished.dtype == np.uint8
    h = qp.damped(hessian, qp.DAMP)
    before = qp.row_loss(w.astype(np.float64), walked, qtype, h)
    after = qp.row_loss(w.astype(np.float64), polished, qtype, h)
    assert (after <= before * (1 + 1e-9)).all(), qtype.name
    assert after.sum() < 0.99 * before.sum(), (qtype.name, after.sum() / before.sum())
    # and the undamped output error, what a matmul loses, falls too
    e = lambda q: w - quants.dequantize(q, qtype).reshape(w.shape)  # noqa: E731
    err = lambda q: float(np.einsum("ij,jk,ik->", e(q), hessian, e(q)))  # noqa: E731
    assert err(polished) < err(walked)


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_XS], ids=lambda t: t.name)
def test_scales_without_a_refit_are_the_walks(qtype, hessian):
    """Q2_K, Q3_K and IQ4_XS scales are left as the walk wrote them: only codes move."""
    w = _weights(seed=4)
    walked, polished = _walk_and_polish(w, qtype, hessian)
    lay = levels.layout(qtype)
    keep, _, _ = levels._packers(qtype)
    non_code = keep == 0xFF  # bytes holding no code bits: the scales
    a, b = walked.reshape(-1, lay.nbytes), polished.reshape(-1, lay.nbytes)
    np.testing.assert_array_equal(a[:, non_code], b[:, non_code])
    assert not np.array_equal(a, b)


def _codes(q, qtype):
    return levels.unpack_codes(q.reshape(-1, levels.layout(qtype).nbytes), qtype)


@pytest.mark.parametrize("qtype", K_REFIT, ids=lambda t: t.name)
def test_k_scale_descent_keeps_codes_and_never_raises_a_rows_loss(qtype, hessian):
    w = _weights(seed=5).astype(np.float64)
    h = qp.damped(hessian, qp.DAMP)
    start = qp.descend(w, quantize_compensated(w, qtype, None, hessian, do_polish=False), qtype, h)
    moved = qp.descend_k_scales(w, start, qtype, h)
    np.testing.assert_array_equal(_codes(moved, qtype), _codes(start, qtype))
    before, after = qp.row_loss(w, start, qtype, h), qp.row_loss(w, moved, qtype, h)
    assert (after <= before * (1 + 1e-9)).all()
    assert after.sum() < before.sum()
    d, dmin, sc, m = qp._k_header(moved.reshape(-1, levels.layout(qtype).nbytes), qtype)
    lo = -128 if qtype == T.Q6_K else 0
    assert sc.min() >= lo and sc.max() <= qp.K_REFIT[qtype.name][1] and m.min() >= 0 and m.max() <= 63
    np.testing.assert_array_equal(d, qp._k_header(start.reshape(-1, levels.layout(qtype).nbytes), qtype)[0])


def _descend_k_scales_direct(w, out, qtype, h, sweeps):
    """The K-scale descent written out plainly: every row, sweep and sub-block; each move's gain from its own
    weight change u, -2 u.g + u H u, the first of equal gains kept. The reference for the vectorised pass."""
    qtype, blocks, level, (n, k, nsb, per, sub, top, affine) = qp._k_blocks(w, out, qtype)
    d, dmin, sc, m = qp._k_header(blocks, qtype)
    sc, m = sc.reshape(n, nsb * per).copy(), m.reshape(n, nsb * per).copy()
    g = (w - quants.dequantize(out, qtype).reshape(n, k).astype(np.float64)) @ h
    moves = [(1, 0), (-1, 0)] + ([(0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)] if affine else [])
    lo = 0 if affine else -128
    for r in range(n):
        for _ in range(sweeps):
            moved = False
            for j in range(nsb * per):
                cols = slice(j * sub, (j + 1) * sub)
                u_s = d.reshape(n, nsb)[r, j // per] * level[r, j]
                u_m = -dmin.reshape(n, nsb)[r, j // per] * np.ones(sub)
                best, pick = 0.0, None
                for ts, tm in moves:
                    u = ts * u_s + tm * u_m
                    quad = u @ h[cols, cols] @ u
                    gain = -2.0 * u @ g[r, cols] + quad
                    if (lo <= sc[r, j] + ts <= top and 0 <= m[r, j] + tm <= top and gain < best
                            and gain < -1e-12 * quad):
                        best, pick = gain, (ts, tm, u)
                if pick is not None:
                    ts, tm, u = pick
                    sc[r, j] += ts
                    m[r, j] += tm
                    g[r] -= u @ h[cols, :]
                    moved = True
            if not moved:
                break
    qp._set_k_header(blocks, qtype, d, sc.reshape(n * nsb, per), dmin, m.reshape(n * nsb, per))
    return blocks.reshape(out.shape)


@pytest.mark.parametrize("qtype", K_REFIT, ids=lambda t: t.name)
def test_k_scale_descent_moves_as_the_direct_computation(qtype, hessian):
    """The vectorised descent (quadratic forms shared by the moves, only still-moving rows visited) makes the
    same moves as the plain per-row loop: byte for byte on rows of ordinary and of very different scales."""
    w = _weights(rows=10, seed=11).astype(np.float64)
    w[2] *= 1e4
    w[5] *= 1e-3
    h = qp.damped(hessian, qp.DAMP)
    start = qp.descend(w, quantize_compensated(w, qtype, None, hessian, do_polish=False), qtype, h)
    fast = qp.descend_k_scales(w, start, qtype, h, sweeps=4)
    assert not np.array_equal(fast, start)
    np.testing.assert_array_equal(fast, _descend_k_scales_direct(w, start, qtype, h, sweeps=4))


@pytest.mark.parametrize("qtype", K_REFIT, ids=lambda t: t.name)
def test_k_refit_super_scales_are_the_least_squares_optimum(qtype, hessian):
    """With codes and the new integer sub-block scales fixed, each row's super-scales (d, and dmin) solve the dense
    least-squares problem (before fp16 rounding): the decoded row equals the solution's up to fp16."""
    w = _weights(rows=3, seed=6).astype(np.float64)
    h = qp.damped(hessian, qp.DAMP)
    q = qp.descend(w, quantize_compensated(w, qtype, None, hessian, do_polish=False), qtype, h)
    refit = qp.refit_k(w, q, qtype, h)
    np.testing.assert_array_equal(_codes(refit, qtype), _codes(q, qtype))
    lay = levels.layout(qtype)
    blocks = refit.reshape(-1, lay.nbytes)
    d, dmin, sc, m = qp._k_header(blocks, qtype)
    sub = qp.K_REFIT[qtype.name][0]
    level = lay.table[levels.unpack_codes(blocks, qtype)].reshape(3, -1, sub)          # (rows, sub-blocks, sub)
    coef_d = (sc.reshape(3, -1)[..., None] * level).reshape(3, K // 256, 256)
    coef_m = np.repeat(m.reshape(3, -1), sub, axis=1).reshape(3, K // 256, 256).astype(np.float64)
    nsb = K // 256
    for r in range(3):
        a = np.zeros((K, 2 * nsb))
        for b in range(nsb):
            a[b * 256:(b + 1) * 256, b] = coef_d[r, b]
            a[b * 256:(b + 1) * 256, nsb + b] = -coef_m[r, b]
        if qtype == T.Q6_K:
            a = a[:, :nsb]
        x = np.linalg.lstsq(a.T @ h @ a, a.T @ h @ w[r], rcond=None)[0]
        got = quants.dequantize(refit, qtype).reshape(3, K)[r]
        expect = a @ x.astype(np.float16).astype(np.float64)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d.reshape(3, -1)[r], x[:nsb], rtol=2e-3)


@pytest.mark.parametrize("qtype", REFIT, ids=lambda t: t.name)
def test_refit_is_the_least_squares_optimum(qtype):
    """With the codes fixed, the refitted scales (before fp16 rounding) solve min_x (w - A x) H (w - A x)^T, A the
    per-block design matrix: checked against a dense lstsq on H's Cholesky factor."""
    rng = np.random.default_rng(5)
    k = 64
    w = rng.standard_normal((3, k))
    m = rng.standard_normal((k, k))
    h = m @ m.T / k + 0.1 * np.eye(k)
    q = quants.quantize(w.astype(np.float32), qtype)
    refit = qp.refit(w, q, qtype, h)
    lay = levels.layout(qtype)
    affine = qp.REFIT_TYPES[qtype.name]
    codes = levels.unpack_codes(q.reshape(-1, lay.nbytes), qtype)
    np.testing.assert_array_equal(levels.unpack_codes(refit.reshape(-1, lay.nbytes), qtype), codes)
    level = lay.table[codes].reshape(3, k)
    chol = np.linalg.cholesky(h)  # H = L L^T: (w - A x) H (w - A x)^T = |L^T (w - A x)|^2
    nblk = k // 32
    got = quants.dequantize(refit, qtype).reshape(3, k)
    for r in range(3):
        a = np.zeros((k, nblk * (2 if affine else 1)))
        for b in range(nblk):
            a[b * 32:(b + 1) * 32, b] = level[r, b * 32:(b + 1) * 32]
            if affine:
                a[b * 32:(b + 1) * 32, nblk + b] = 1.0
        x, *_ = np.linalg.lstsq(chol.T @ a, chol.T @ w[r], rcond=None)
        want = a @ x
        want16 = a @ x.astype(np.float16).astype(np.float64)
        # got is the fp16-rounded optimum: within the rounding of the scales of the exact one
        np.testing.assert_allclose(got[r], want16, rtol=1e-6, atol=1e-6)
        start = quants.dequantize(q, qtype).reshape(3, k)[r]
        assert (w[r] - want) @ h @ (w[r] - want) <= (w[r] - start) @ h @ (w[r] - start) + 1e-12


@pytest.mark.parametrize("qtype", [T.Q5_1, T.Q4_K, T.IQ4_NL, T.Q8_0], ids=lambda t: t.name)
def test_compiled_descent_equals_numpy_descent(qtype, hessian, monkeypatch):
    if not qp.USE_NUMBA:
        pytest.skip("numba kernel not in use (numba missing or its self-check failed)")
    w = _weights(rows=12, seed=6)
    fast = quantize_compensated(w, qtype, None, hessian)
    monkeypatch.setattr(qp, "USE_NUMBA", False)
    np.testing.assert_array_equal(quantize_compensated(w, qtype, None, hessian), fast)


def test_rows_stay_independent(hessian, monkeypatch):
    import quants.compensate as qc

    w = _weights(rows=20, seed=7)
    whole = quantize_compensated(w, T.Q5_1, None, hessian)
    monkeypatch.setattr(qc, "ROW_CHUNK", 3)
    np.testing.assert_array_equal(quantize_compensated(w, T.Q5_1, None, hessian), whole)
    np.testing.assert_array_equal(quantize_compensated(w[5:6], T.Q5_1, None, hessian), whole[5:6])


@pytest.mark.parametrize("qtype", K_REFIT, ids=lambda t: t.name)
def test_k_scale_passes_keep_rows_independent(qtype, hessian):
    """A row's polished K-quant bytes do not depend on which rows share its batch (the scale descent's stop
    threshold is per row), so a tensor encodes the same in any chunking."""
    w = _weights(rows=12, seed=9)
    whole = quantize_compensated(w, qtype, None, hessian)
    for r in (0, 7):
        np.testing.assert_array_equal(quantize_compensated(w[r:r + 1], qtype, None, hessian), whole[r:r + 1])
    # one row scaled 1e5x: its gains dwarf the others', which must not change the others' stopping
    loud = w.copy()
    loud[3] *= 1e5
    np.testing.assert_array_equal(np.delete(quantize_compensated(loud, qtype, None, hessian), 3, axis=0),
                                  np.delete(whole, 3, axis=0))


def test_zero_rows_and_blocks_stay_finite(hessian):
    """A block of zeros (scale 0) and a block of one repeated value (a singular refit) decode finitely."""
    w = _weights(rows=4, seed=8)
    w[1] = 0.0
    w[2, 64:96] = 0.25
    w[3, 256:512] = -0.5
    for qtype in REFIT + K_REFIT:
        y = quants.dequantize(quantize_compensated(w, qtype, None, hessian), qtype).reshape(w.shape)
        assert np.isfinite(y).all(), qtype.name
        np.testing.assert_array_equal(y[1], 0.0)


@pytest.mark.reference
@pytest.mark.parametrize("qtype", REFIT + K_REFIT + [T.Q3_K], ids=lambda t: t.name)
def test_polished_bytes_decode_with_libggml(reference, qtype, hessian):
    from llamacpp.ggml import ggml_dequantize, load_libggml

    load_libggml(str(reference.libggml_base()))
    w = _weights(rows=8, seed=9)
    q = quantize_compensated(w, qtype, None, hessian)
    np.testing.assert_array_equal(ggml_dequantize(q, int(qtype), K), quants.dequantize(q, qtype).reshape(w.shape))
