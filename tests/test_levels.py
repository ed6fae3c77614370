"""`quants.levels`: where each weight's code sits in a block and the grid the scale bytes put it on, checked
against the bytes our ggml-exact quantizers write, gguf-py's dequantizers and libggml's."""

from __future__ import annotations

import numpy as np
import pytest

import quants
from quants import levels

TYPES = [t for t in quants.WRITABLE_TYPES if t.name not in ("F32", "F16", "BF16")]


def _blocks(qtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 512)) * rng.gamma(1.0, 1.0, (24, 1))).astype(np.float32)
    imp = rng.gamma(0.8, 1.0, 512).astype(np.float32)
    lay = levels.layout(qtype)
    return quants.quantize(x, qtype, imp).reshape(-1, lay.nbytes), x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_unpack_then_pack_gives_the_same_bytes(qtype):
    blocks, _ = _blocks(qtype)
    assert np.array_equal(levels.pack_codes(blocks, levels.unpack_codes(blocks, qtype), qtype), blocks)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_grid_decodes_every_code_as_gguf_py_does(qtype):
    """Random codes at every weight: scale * table[code] - offset equals gguf-py's dequantization, so each
    weight's bits sit where the layout says (a permuted layout fails here) and no scale byte was touched."""
    blocks, _ = _blocks(qtype, seed=1)
    lay = levels.layout(qtype)
    scale, offset = levels.grid(blocks, qtype)
    rng = np.random.default_rng(2)
    codes = lay.allowed[rng.integers(0, len(lay.allowed), (blocks.shape[0], lay.block))]
    packed = levels.pack_codes(blocks, codes, qtype)
    want = quants.dequantize(packed, qtype).reshape(codes.shape)
    np.testing.assert_allclose(scale * lay.table[codes] - offset, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.array_equal(levels.unpack_codes(packed, qtype), codes)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_ggml_codes_are_on_the_grid_near_the_weights(qtype):
    """ggml's own code is (nearly always) the nearest level of its block's grid: the grid is the right one."""
    blocks, x = _blocks(qtype, seed=3)
    lay = levels.layout(qtype)
    scale, offset = levels.grid(blocks, qtype)
    codes = levels.unpack_codes(blocks, qtype)
    cand = scale[..., None] * lay.table[lay.allowed] - offset[..., None]
    nearest = lay.allowed[np.abs(cand - x.reshape(codes.shape)[..., None].astype(np.float64)).argmin(-1)]
    assert (nearest == codes).mean() > 0.98  # ggml rounds with its unrounded scale; ties and fp16 differ


def test_q8_0_never_offers_minus_128():
    lay = levels.layout(quants.parse_type("Q8_0"))
    assert lay.table[lay.allowed].min() == -127 and len(lay.allowed) == 255


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_libggml_decodes_repacked_codes_like_the_grid(reference, qtype):
    from llamacpp.ggml import ggml_dequantize, load_libggml

    load_libggml(str(reference.libggml_base()))
    blocks, _ = _blocks(qtype, seed=4)
    lay = levels.layout(qtype)
    scale, offset = levels.grid(blocks, qtype)
    codes = lay.allowed[np.random.default_rng(5).integers(0, len(lay.allowed), (blocks.shape[0], lay.block))]
    got = ggml_dequantize(levels.pack_codes(blocks, codes, qtype), int(qtype), lay.block).reshape(codes.shape)
    np.testing.assert_allclose(scale * lay.table[codes] - offset, got, rtol=0, atol=1e-6 * np.abs(got).max())
