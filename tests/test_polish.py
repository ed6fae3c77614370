"""`quants.polish`: after the compensated walk, coordinate descent on the codes and a least-squares refit of the
32-blocks' fp16 scales lower the output error under H, row by row, in bytes ggml decodes."""

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


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q2_K], ids=lambda t: t.name)
def test_k_quant_scales_are_the_walks(qtype, hessian):
    """K-quant scales (6-bit integers under an fp16 super-scale) are not refitted: only codes move."""
    w = _weights(seed=4)
    walked, polished = _walk_and_polish(w, qtype, hessian)
    lay = levels.layout(qtype)
    keep, _, _ = levels._packers(qtype)
    non_code = keep == 0xFF  # bytes holding no code bits: the scales
    a, b = walked.reshape(-1, lay.nbytes), polished.reshape(-1, lay.nbytes)
    np.testing.assert_array_equal(a[:, non_code], b[:, non_code])
    assert not np.array_equal(a, b)


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


def test_zero_rows_and_blocks_stay_finite(hessian):
    """A block of zeros (scale 0) and a block of one repeated value (a singular refit) decode finitely."""
    w = _weights(rows=4, seed=8)
    w[1] = 0.0
    w[2, 64:96] = 0.25
    for qtype in REFIT:
        y = quants.dequantize(quantize_compensated(w, qtype, None, hessian), qtype).reshape(w.shape)
        assert np.isfinite(y).all(), qtype.name
        np.testing.assert_array_equal(y[1], 0.0)


@pytest.mark.reference
@pytest.mark.parametrize("qtype", REFIT + [T.Q5_K, T.Q3_K], ids=lambda t: t.name)
def test_polished_bytes_decode_with_libggml(reference, qtype, hessian):
    from llamacpp.ggml import ggml_dequantize, load_libggml

    load_libggml(str(reference.libggml_base()))
    w = _weights(rows=8, seed=9)
    q = quantize_compensated(w, qtype, None, hessian)
    np.testing.assert_array_equal(ggml_dequantize(q, int(qtype), K), quants.dequantize(q, qtype).reshape(w.shape))
