"""Error-compensated (GPTQ-style) encoding, `quants.compensate`: same GGUF types, blocks ggml decodes, chosen to
cancel output error trace(E H E^T) under an input covariance H. The walk's own properties are tested with
`do_polish=False`; the polish that follows it by default is tested in test_polish.py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import quants
import quants.compensate as qc
from quants.compensate import quantize_compensated

K = 512  # rows of 512: every K-quant applies, and there are 2 super-blocks to compensate across
DIAG_TYPES = [T.Q4_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_NL]
# ggml's importance search for these takes its row statistic (mean x^2) from the block column it is handed;
# for the legacy types it is the whole row, so block-by-block quantization differs (see quants/compensate.py)
PER_BLOCK_STAT = [T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_NL]
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def _weights(rows: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)


def _importance(seed: int = 1) -> np.ndarray:
    imp = np.random.default_rng(seed).gamma(0.7, 1.0, K).astype(np.float32)
    imp[::37] = 0.0
    return imp


def _correlated_hessian(seed: int = 2, dead: np.ndarray | None = None) -> np.ndarray:
    """H = X^T X / n of 4096 samples of Gaussians mixed by a random matrix (strong off-diagonal terms)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K)
    x = rng.standard_normal((4096, K)) @ mix
    if dead is not None:
        x[:, dead] = 0.0
    return x.T @ x / x.shape[0]


@pytest.fixture(scope="module")
def hessian() -> np.ndarray:
    return _correlated_hessian()


def _output_error(w: np.ndarray, y: np.ndarray, h: np.ndarray) -> float:
    e = (y.astype(np.float64) - w.astype(np.float64))
    return float(np.einsum("ij,jk,ik->", e, h, e))


def _decode(q: np.ndarray, qtype, shape) -> np.ndarray:
    return quants.dequantize(q, qtype).reshape(shape)


# --- a diagonal H has nothing to compensate --------------------------------------------------------------

@pytest.mark.parametrize("qtype", DIAG_TYPES, ids=lambda t: t.name)
def test_diagonal_hessian_equals_plain_quantize(qtype):
    w = _weights(seed=10)
    h = np.diag(np.random.default_rng(11).gamma(0.7, 1.0, K) + 0.05)
    got = quantize_compensated(w, qtype, None, h, do_polish=False)
    want = quants.quantize(w, qtype, None)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # the public dispatch is the polished encoding
    np.testing.assert_array_equal(quants.quantize(w, qtype, None, hessian=h), quantize_compensated(w, qtype, None, h))


@pytest.mark.parametrize("qtype", PER_BLOCK_STAT, ids=lambda t: t.name)
def test_diagonal_hessian_with_importance_equals_plain_quantize(qtype):
    w, imp = _weights(seed=12), _importance()
    h = np.diag(imp.astype(np.float64) + 0.05)
    np.testing.assert_array_equal(quantize_compensated(w, qtype, imp, h, do_polish=False),
                                  quants.quantize(w, qtype, imp))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_diagonal_hessian_legacy_importance_is_blockwise_quantize(qtype):
    """Legacy types with an imatrix: the documented encoding is each block column quantized on its own (ggml's
    row statistic then comes from that column), which is what a diagonal H must reduce to."""
    w, imp = _weights(seed=13), _importance()
    h = np.diag(imp.astype(np.float64) + 0.05)
    bs = quants.block_size(qtype)
    blockwise = np.concatenate([quants.quantize(np.ascontiguousarray(w[:, c:c + bs]), qtype, imp[c:c + bs])
                                for c in range(0, K, bs)], axis=1)
    np.testing.assert_array_equal(quantize_compensated(w, qtype, imp, h, do_polish=False), blockwise)


# --- a correlated H: lower output error, still ggml-decodable bytes ----------------------------------------

@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.IQ4_NL], ids=lambda t: t.name)
def test_correlated_hessian_lowers_output_error(qtype, with_importance, hessian):
    w = _weights(rows=64, seed=20)
    imp = np.diag(hessian).astype(np.float32) if with_importance else None
    q = quants.quantize(w, qtype, imp, hessian=hessian)
    assert q.dtype == np.uint8 and q.shape == (64, quants.row_bytes(qtype, K))
    comp = _decode(q, qtype, w.shape)
    np.testing.assert_array_equal(comp, quants.round_trip(w, qtype, imp, hessian=hessian))
    plain = quants.round_trip(w, qtype, imp)
    e_comp, e_plain = _output_error(w, comp, hessian), _output_error(w, plain, hessian)
    assert e_comp < 0.9 * e_plain, (qtype.name, e_comp, e_plain)
    # and the bytes are still a quantization of w, not something far away from it
    assert np.abs(comp - w).mean() < 0.5 * np.abs(w).mean()


@pytest.mark.reference
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_compensated_bytes_decode_with_libggml(reference, qtype, hessian):
    from llamacpp.ggml import ggml_dequantize, load_libggml

    load_libggml(str(reference.libggml_base()))
    w = _weights(rows=16, seed=21)
    imp = np.diag(hessian).astype(np.float32)
    q = quants.quantize(w, qtype, imp, hessian=hessian)
    np.testing.assert_array_equal(ggml_dequantize(q, int(qtype), K), _decode(q, qtype, w.shape))


def _reference_gptq(w: np.ndarray, qtype: T, h: np.ndarray, damp: float = qc.DAMP) -> np.ndarray:
    """GPTQ as the paper's Algorithm 1 (one column at a time, whole-row updates, no lazy batches): libggml
    quantizes each block of the nudged weights when the walk reaches it (fixing its scales), and every weight
    then takes the code whose libggml-decoded value is nearest (ggml's own code while nothing moved it)."""
    from llamacpp.ggml import ggml_dequantize, ggml_quantize
    from quants import levels

    lay = levels.layout(qtype)
    bs = lay.block
    hd = h + damp * np.mean(np.diag(h)) * np.eye(K)
    u = np.linalg.cholesky(np.linalg.inv(hd)).T
    work = w.astype(np.float64).copy()
    out = []
    for c in range(0, K, bs):
        start = work[:, c:c + bs].copy()
        blocks = ggml_quantize(start.astype(np.float32), int(qtype))
        codes = levels.unpack_codes(blocks, qtype)
        # value of every code at every weight, decoded by libggml: (rows, bs, codes)
        values = np.stack([ggml_dequantize(levels.pack_codes(blocks, np.full(codes.shape, a), qtype), int(qtype), bs)
                           for a in lay.allowed], axis=-1).astype(np.float64)
        for i in range(bs):
            j = c + i
            moved = work[:, j] != start[:, i]
            best = lay.allowed[np.abs(values[:, i, :] - work[:, j, None]).argmin(axis=1)]
            codes[:, i] = np.where(moved, best, codes[:, i])
            chosen = values[np.arange(len(codes)), i, _index_of(lay.allowed, codes[:, i])]
            err = (work[:, j] - chosen) / u[j, j]
            work[:, j + 1:] -= np.outer(err, u[j, j + 1:])
        out.append(levels.pack_codes(blocks, codes, qtype))
    return np.concatenate(out, axis=1)


def _index_of(allowed: np.ndarray, codes: np.ndarray) -> np.ndarray:
    pos = np.empty(int(allowed.max()) + 1, dtype=np.int64)
    pos[allowed] = np.arange(len(allowed))
    return pos[codes]


@pytest.mark.reference
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.IQ4_NL, T.Q6_K], ids=lambda t: t.name)
def test_matches_reference_gptq_with_libggml_blocks(reference, qtype, hessian):
    """Every block's scales are what ggml writes for the nudged weights and every code the nearest level: an
    independent column-by-column GPTQ over libggml agrees (rows, not bytes: a last-ulp BLAS difference may
    flip one rounding and change the rest of that row)."""
    from llamacpp.ggml import load_libggml

    load_libggml(str(reference.libggml_base()))
    w = _weights(rows=32, seed=22)
    ours = quantize_compensated(w, qtype, None, hessian, do_polish=False)
    ref = _reference_gptq(w, qtype, hessian)
    same_rows = (ours == ref).all(axis=1)
    assert same_rows.mean() >= 0.9, f"{qtype.name}: {int((~same_rows).sum())} of {len(same_rows)} rows differ"


def test_damping_is_used(hessian):
    w = _weights(rows=16, seed=23)
    a = quantize_compensated(w, T.Q4_0, None, hessian, do_polish=False)
    b = quantize_compensated(w, T.Q4_0, None, hessian, damp=10.0, do_polish=False)  # H swamped by the identity
    assert not np.array_equal(a, b)
    assert _output_error(w, _decode(a, T.Q4_0, w.shape), hessian) < _output_error(w, _decode(b, T.Q4_0, w.shape),
                                                                                  hessian)


# --- rows are independent ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K], ids=lambda t: t.name)
def test_rows_are_independent(qtype, hessian, monkeypatch):
    w, imp = _weights(rows=24, seed=30), _importance()
    whole = quantize_compensated(w, qtype, imp, hessian)
    halves = np.concatenate([quantize_compensated(w[:11], qtype, imp, hessian),
                             quantize_compensated(w[11:], qtype, imp, hessian)], axis=0)
    np.testing.assert_array_equal(whole, halves)
    monkeypatch.setattr(qc, "ROW_CHUNK", 5)  # 24 rows in chunks of 5: the last one partial
    np.testing.assert_array_equal(quantize_compensated(w, qtype, imp, hessian), whole)
    monkeypatch.setattr(qc, "ROW_CHUNK", 1)
    np.testing.assert_array_equal(quantize_compensated(w, qtype, imp, hessian), whole)


def test_single_row(hessian):
    w = _weights(rows=8, seed=31)
    whole = quantize_compensated(w, T.Q4_K, None, hessian)
    for r in (0, 7):
        np.testing.assert_array_equal(quantize_compensated(w[r:r + 1], T.Q4_K, None, hessian), whole[r:r + 1])


# --- float types pass through --------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_float_types_pass_through(qtype, hessian):
    w = _weights(rows=8, seed=40)
    want = quants.quantize(w, qtype)
    got = quantize_compensated(w, qtype, None, hessian)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(quants.quantize(w, qtype, hessian=hessian).view(np.uint8), want.view(np.uint8))


# --- bad input --------------------------------------------------------------------------------------------

def test_wrong_hessian_shape():
    w = _weights(rows=4)
    for h in (np.eye(256), np.ones((K, K + 1)), np.ones(K)):
        with pytest.raises(quants.QuantInputError, match=r"covariance has shape .*512 columns.*another model") as ei:
            quants.quantize(w, "q4_0", hessian=h, name="blk.3.attn_q.weight")
        assert "blk.3.attn_q.weight" in str(ei.value) and "\n" not in str(ei.value)
        with pytest.raises(quants.QuantInputError, match="covariance has shape"):
            quantize_compensated(w, "q4_k", None, h)


def test_three_d_data_rejected():
    w = _weights(rows=4)[None].repeat(2, axis=0)
    with pytest.raises(quants.QuantInputError, match=r"2-D weights.*3-D tensor without an input covariance"):
        quants.quantize(w, "q4_0", hessian=np.eye(K), name="blk.0.ffn_up_exps.weight")
    with pytest.raises(quants.QuantInputError, match=r"2-D matrix, got shape \(2, 4, 512\)"):
        quantize_compensated(w, "q4_0", None, np.eye(K))
    with pytest.raises(quants.QuantInputError, match="2-D"):
        quants.quantize(w[0, 0], "q4_0", hessian=np.eye(K))


def test_row_length_not_block_multiple():
    w = np.random.default_rng(5).standard_normal((4, 500)).astype(np.float32)
    h = np.eye(500)
    for fn in (lambda: quants.quantize(w, "q4_0", hessian=h, name="blk.1.ffn_down.weight"),
               lambda: quantize_compensated(w, "q4_0", None, h, name="blk.1.ffn_down.weight")):
        with pytest.raises(quants.QuantInputError, match=r"row length 500 is not a multiple of the Q4_0 block size 32"):
            fn()
    w2 = np.random.default_rng(5).standard_normal((4, 288)).astype(np.float32)  # fine for Q4_0, not for Q4_K
    with pytest.raises(quants.QuantInputError, match="block size 256"):
        quants.quantize(w2, "q4_k", hessian=np.eye(288))
    assert quants.quantize(w2, "q4_0", hessian=np.eye(288)).shape == (4, quants.row_bytes("q4_0", 288))


def test_other_bad_inputs():
    w = _weights(rows=4)
    with pytest.raises(quants.QuantInputError, match="importance vector has 100 entries"):
        quants.quantize(w, "q4_k", np.ones(100, np.float32), hessian=np.eye(K))
    bad = w.copy()
    bad[1, 3] = np.nan
    with pytest.raises(quants.QuantInputError, match="NaN"):
        quants.quantize(bad, "q4_k", hessian=np.eye(K))
    indefinite = np.eye(K)
    indefinite[0, 1] = indefinite[1, 0] = 5.0
    with pytest.raises(quants.QuantInputError, match="not positive definite"):
        quants.quantize(w, "q4_0", hessian=indefinite)


# --- dead columns -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.IQ4_NL, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_dead_columns(qtype):
    dead = np.zeros(K, bool)
    dead[480:] = True     # a whole trailing block never activated
    dead[100:110] = True  # part of a block
    dead[257] = True
    h = _correlated_hessian(seed=3, dead=dead)
    assert (np.diag(h)[dead] == 0).all() and (h[dead] == 0).all()
    w = _weights(rows=32, seed=50)
    for imp in (None, np.diag(h).astype(np.float32)):  # an imatrix is zero there too
        q = quants.quantize(w, qtype, imp, hessian=h)
        y = _decode(q, qtype, w.shape)
        assert np.isfinite(y).all()
        assert np.abs(y - w).mean() < 0.5 * np.abs(w).mean()
        plain = quants.round_trip(w, qtype, imp)
        assert _output_error(w, y, h) < _output_error(w, plain, h)
        if quants.block_size(qtype) == 32:  # dead columns get no correction: the trailing dead block is plain
            walked = _decode(quantize_compensated(w, qtype, imp, h, do_polish=False), qtype, w.shape)
            np.testing.assert_array_equal(walked[:, 480:], plain[:, 480:])


def test_all_dead_hessian_is_plain():
    w = _weights(rows=8, seed=51)
    np.testing.assert_array_equal(quantize_compensated(w, T.Q4_K, None, np.zeros((K, K)), do_polish=False),
                                  quants.quantize(w, T.Q4_K))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_1, T.IQ4_NL, T.Q3_K, T.Q6_K], ids=lambda t: t.name)
def test_compiled_walk_equals_numpy_walk(qtype, hessian, monkeypatch):
    if not qc.USE_NUMBA:
        pytest.skip("numba kernel not in use (numba missing or its self-check failed)")
    w = _weights(rows=24, seed=31)
    imp = _importance()
    fast = quantize_compensated(w, qtype, imp, hessian)
    monkeypatch.setattr(qc, "USE_NUMBA", False)
    assert np.array_equal(quantize_compensated(w, qtype, imp, hessian), fast)
