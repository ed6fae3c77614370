"""The public quants API: parity of `quants.quantize` with libggml for every writable type, input errors,
and registration into gguf's registry."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

import quants

QUANTIZED = [t for t in quants.WRITABLE_TYPES if t not in (T.F32, T.F16, T.BF16)]


def _data(kind: str, rows: int = 16, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "gaussian":
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    if kind == "sparse-signed-zeros":  # non-negative blocks whose min is a zero of either sign
        x = np.abs(rng.standard_normal((rows, cols)).astype(np.float32))
        x[rng.random((rows, cols)) < 0.6] = 0.0
        x[rng.random((rows, cols)) < 0.2] = -0.0
        return x
    raise ValueError(kind)


def _importance(cols: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    imp = rng.gamma(0.7, 1.0, cols).astype(np.float32)
    imp[::37] = 0.0
    return imp


@pytest.mark.reference
@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", ["gaussian", "sparse-signed-zeros"])
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_public_quantize_matches_ggml(reference, qtype, kind, with_importance):
    from llamacpp.ggml import ggml_quantize

    x = _data(kind)
    imp = _importance(x.shape[1]) if with_importance else None
    ours = quants.quantize(x, qtype, imp)
    theirs = ggml_quantize(x, int(qtype), imp)
    bs, ts = quants.block_size(qtype), quants.row_bytes(qtype, quants.block_size(qtype))
    differ = (ours.reshape(-1, ts) != theirs.reshape(-1, ts)).any(axis=1)
    assert not differ.any(), f"{qtype.name}: {int(differ.sum())}/{differ.size} blocks differ from ggml (block {bs})"


@pytest.mark.reference
@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_ggml(reference, qtype):
    from llamacpp.ggml import ggml_quantize

    x = _data("gaussian")
    x[0, :4] = [65504.0 * 2, -1e-8, 3.0e38, 1e-45]  # overflow, subnormal, bf16 rounding edge
    ours = np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)
    assert (ours == ggml_quantize(x, int(qtype))).all()


def test_parse_type_is_case_insensitive_and_names_valid_types():
    assert quants.parse_type("q4_k") is T.Q4_K
    assert quants.parse_type("IQ4_xs") is T.IQ4_XS
    with pytest.raises(quants.QuantInputError, match="valid types: .*Q4_K"):
        quants.parse_type("q4_k_m")


def test_bad_input_errors_name_the_tensor():
    x = np.ones((2, 256), dtype=np.float32)
    x[1, 3] = np.nan
    with pytest.raises(quants.QuantInputError, match="'blk.0.attn_q.weight'.*NaN"):
        quants.quantize(x, "q4_k", name="blk.0.attn_q.weight")
    with pytest.raises(quants.QuantInputError, match="row length 320 is not a multiple of the Q4_K block size 256"):
        quants.quantize(np.ones((2, 320), np.float32), "q4_k")
    with pytest.raises(quants.QuantInputError, match="importance vector has 10 entries"):
        quants.quantize(np.ones((2, 256), np.float32), "q4_k", np.ones(10, np.float32))
    with pytest.raises(quants.QuantInputError, match="negative, NaN or Inf"):
        quants.quantize(np.ones((2, 256), np.float32), "q4_k", -np.ones(256, np.float32))


def test_registration_makes_gguf_quantize_k_quants():
    import gguf

    x = _data("gaussian", rows=3, cols=512)
    for qtype in (T.Q4_K, T.Q6_K, T.IQ4_XS, T.Q2_K):
        assert np.array_equal(gguf.quants.quantize(x, qtype), quants.quantize(x, qtype))


def test_per_expert_importance_and_round_trip():
    """A 3-D tensor with a 2-D importance quantizes expert e with importance[e] (llama-quantize's `_exps` rule);
    round_trip is quantize then dequantize in the tensor's shape."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8, 256)).astype(np.float32)
    imp = rng.gamma(0.5, 1.0, (3, 256)).astype(np.float32)
    q = quants.quantize(x, "Q4_K", imp)
    for e in range(3):
        np.testing.assert_array_equal(q[e], quants.quantize(x[e], "Q4_K", imp[e]))
    assert not np.array_equal(q[1], quants.quantize(x[1], "Q4_K", imp[0]))  # the expert's own row matters
    r = quants.round_trip(x, "Q4_K", imp)
    assert r.shape == x.shape and r.dtype == np.float32
    np.testing.assert_array_equal(r[2], quants.dequantize(q[2], "Q4_K").reshape(8, 256))
    with pytest.raises(quants.QuantInputError, match=r"expert 1"):
        bad = imp.copy()
        bad[1, 0] = np.nan
        quants.quantize(x, "Q4_K", bad, name="blk.0.ffn_down_exps.weight")


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q6_K, T.IQ4_XS, T.BF16],
                         ids=lambda t: t.name)
def test_dequantize_in_chunks_equals_gguf_py(qtype, monkeypatch):
    """quants.dequantize hands gguf-py big runs of blocks (not its 16 rows at a time): same values and shape,
    also when the blocks span several runs and for byte arrays of any leading shape."""
    monkeypatch.setattr(quants, "_DEQUANT_CHUNK", 1024)  # several runs, the last one short
    x = np.random.default_rng(7).standard_normal((3, 5, 512)).astype(np.float32)
    q = quants.quantize(x.reshape(-1, 512), qtype).reshape(3, 5, -1)
    ref = np.asarray(gguf_quants.dequantize(q, qtype), dtype=np.float32)
    for data in (q, q.reshape(15, -1), q.reshape(-1)):
        got = quants.dequantize(data, qtype)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.reshape(ref.shape), ref)
        assert got.shape == np.asarray(gguf_quants.dequantize(data, qtype)).shape
