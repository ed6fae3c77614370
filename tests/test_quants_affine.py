"""Q2_K, Q4_K, Q5_K, Q4_1, Q5_1: our quantizers against libggml's ggml_quantize_chunk, byte for byte.

Acceptance (from the issue): >= 99.9% of blocks byte-identical; a differing block must have an
importance-weighted squared error within 1e-6 relative of ggml's. In practice we expect 100%.
The parity tests run twice, on the numpy reference path and on the optional numba fast path
(quants/affine_numba.py, switched by affine_numba.USE_NUMBA), and the two paths are also compared
with each other directly (no libggml needed).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import quants
from quants import affine_numba
from quants import affine_search as aff
from quants.q2_k import quantize_q2_k
from quants.q4_1 import quantize_q4_1
from quants.q4_k import quantize_q4_k
from quants.q5_1 import quantize_q5_1
from quants.q5_k import quantize_q5_k

OURS = {T.Q2_K: quantize_q2_k, T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k,
        T.Q4_1: quantize_q4_1, T.Q5_1: quantize_q5_1}
N_PER_ROW = 1024


def _gauss(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((12, N_PER_ROW)).astype(np.float32)


def _student2(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_t(2, (12, N_PER_ROW)).astype(np.float32)


def _student3(rng: np.random.Generator) -> np.ndarray:
    return (0.02 * rng.standard_t(3, (12, N_PER_ROW))).astype(np.float32)


def _outliers(rng: np.random.Generator) -> np.ndarray:
    x = _gauss(rng)
    idx = rng.integers(0, x.size, 24)
    x.flat[idx] = rng.choice([-1.0, 1.0], 24) * rng.uniform(50, 1e4, 24)
    return x


def _zeros(rng: np.random.Generator) -> np.ndarray:
    x = _gauss(rng)
    x[1] = 0.0  # an all-zero row
    x[2, :256] = 0.0  # an all-zero super-block
    x[3, 32:64] = 0.0  # an all-zero 32-block
    x[4, 16:32] = -0.0
    x[5, ::2] = -0.0  # signed zeros decide the sign of a zero offset
    x[6] = np.where(rng.random(N_PER_ROW) < 0.5, -0.0, 0.0)
    x[7] = x[7] * (rng.random(N_PER_ROW) < 0.05)  # sparse
    x[8, :64] = 3.5  # constant blocks
    x[9, :64] = -2.0
    return x


def _tiny(rng: np.random.Generator) -> np.ndarray:
    return (_gauss(rng) * np.float32(1e-30)).astype(np.float32)


def _mixed_scale(rng: np.random.Generator) -> np.ndarray:
    return (_gauss(rng) * np.exp(rng.uniform(-12, 12, (12, 1)))).astype(np.float32)


def _extreme(rng: np.random.Generator) -> np.ndarray:
    """Blocks from 1e-38 to 1e30, subnormal spreads, and a row whose sums overflow float32 to inf."""
    scale = np.exp(rng.uniform(-85, 69, (12, N_PER_ROW // 32, 1)))
    x = (rng.standard_t(3, (12, N_PER_ROW // 32, 32)) * scale).astype(np.float32).reshape(12, N_PER_ROW)
    x[3, :64] = np.arange(64, dtype=np.float32) * np.float32(1.4e-45)
    x[4, :128] = np.float32(3e38)
    x[4, 128:256] = np.float32(-3e38)
    return x


DATASETS = {"gaussian": _gauss, "student_t2": _student2, "student_t3": _student3, "outliers": _outliers,
            "zeros": _zeros, "tiny": _tiny, "mixed_scale": _mixed_scale, "extreme": _extreme}


def _importance(rng: np.random.Generator, n: int) -> np.ndarray:
    imp = rng.gamma(0.7, 1.0, n).astype(np.float32)
    imp[rng.integers(0, n, max(1, n // 64))] = 0.0
    return imp


def _weighted_err(x: np.ndarray, blocks: np.ndarray, qtype: T, imp: np.ndarray | None) -> np.ndarray:
    """Importance-weighted squared error per block of the dequantized bytes."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    y = quants.dequantize(blocks.reshape(-1, ts), qtype).reshape(x.shape)
    w = np.ones(x.shape[1], np.float32) if imp is None else imp
    return (((y - x) ** 2) * w).astype(np.float64).reshape(-1, bs).sum(axis=1)


def assert_matches_ggml(x: np.ndarray, qtype: T, imp: np.ndarray | None) -> None:
    from llamacpp.ggml import ggml_quantize

    ours = OURS[qtype](np.ascontiguousarray(x, dtype=np.float32), imp)
    ref = ggml_quantize(x, int(qtype), imp)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    ts = GGML_QUANT_SIZES[qtype][1]
    same = (ours.reshape(-1, ts) == ref.reshape(-1, ts)).all(axis=1)
    if same.all():
        return
    frac = same.mean()
    e_ours = _weighted_err(x, ours, qtype, imp)[~same]
    e_ref = _weighted_err(x, ref, qtype, imp)[~same]
    rel = np.abs(e_ours - e_ref) / np.maximum(np.abs(e_ref), 1e-30)
    first = int(np.flatnonzero(~same)[0])
    assert frac >= 0.999 and (rel <= 1e-6).all(), (
        f"{qtype.name}: {(~same).sum()} of {same.size} blocks differ from ggml (first: block {first}), "
        f"max relative weighted-error difference {rel.max():.3g}")


@pytest.fixture(scope="session")
def libggml(reference):
    from llamacpp.ggml import load_libggml

    return load_libggml(str(reference.libggml_base()))


def _require_numba() -> None:
    if not affine_numba.AVAILABLE:
        pytest.skip("numba not installed (or its kernels failed the import self-check): numpy path only")


@pytest.fixture(params=["numpy", "numba"])
def path(request, monkeypatch) -> str:
    """Run the test on the numpy reference path and again on the numba fast path."""
    if request.param == "numba":
        _require_numba()
    monkeypatch.setattr(affine_numba, "USE_NUMBA", request.param == "numba")
    return request.param


@pytest.mark.reference
@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_matches_ggml(libggml, path: str, qtype: T, dataset: str, with_importance: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name}/{dataset}".encode()))
    x = DATASETS[dataset](rng)
    imp = _importance(rng, x.shape[1]) if with_importance else None
    assert_matches_ggml(x, qtype, imp)


@pytest.mark.reference
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_single_row_and_odd_row_counts(libggml, path: str, qtype: T) -> None:
    """One row (numpy reductions change strategy on a single column) and a row count that is not a chunk multiple."""
    rng = np.random.default_rng(7)
    for n_rows, n in ((1, 256), (3, 512), (1, 4096)):
        x = rng.standard_normal((n_rows, n)).astype(np.float32)
        assert_matches_ggml(x, qtype, None)
        assert_matches_ggml(x, qtype, _importance(rng, n))


@pytest.mark.reference
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_roundtrip_dequantizers_agree(libggml, path: str, qtype: T) -> None:
    """Our bytes decode to the same floats with gguf-py's dequantizer and with ggml's."""
    from llamacpp.ggml import ggml_dequantize

    rng = np.random.default_rng(3)
    x = _outliers(rng)
    for imp in (None, _importance(rng, x.shape[1])):
        q = OURS[qtype](x, imp)
        ours = quants.dequantize(q.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype).reshape(x.shape)
        ref = ggml_dequantize(q, int(qtype), x.shape[1])
        np.testing.assert_array_equal(ours, ref)
        assert np.abs(ref - x).mean() < np.abs(x).mean()  # and they are a quantization of x


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_public_api_dispatches_here(qtype: T) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    imp = _importance(rng, 512)
    got = quants.quantize(x, qtype, imp)
    np.testing.assert_array_equal(got.reshape(6, -1), OURS[qtype](x.reshape(6, 512), imp))


def _smollm2_rows() -> list[tuple[str, np.ndarray]]:
    d = os.environ.get("SMOLLM2_DIR")
    if not d or not (Path(d) / "model.safetensors").is_file():
        pytest.skip("set SMOLLM2_DIR to a SmolLM2 checkpoint (python ../shared/tools/make_real_model.py "
                    "--smollm2 --out DIR) to test on real weights")
    from safetensors import safe_open

    out = []
    with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.5.self_attn.q_proj.weight",
                     "model.layers.29.mlp.gate_proj.weight", "model.embed_tokens.weight"):
            if name in f.keys():
                out.append((name, f.get_slice(name)[:48].float().numpy()))
    return out


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_matches_ggml_on_real_weights(libggml, path: str, qtype: T) -> None:
    rng = np.random.default_rng(11)
    tested = 0
    for _name, w in _smollm2_rows():
        if w.shape[1] % GGML_QUANT_SIZES[qtype][0]:
            continue  # e.g. 576-wide rows cannot be K-quants
        assert_matches_ggml(w, qtype, None)
        col_energy = (w.astype(np.float64) ** 2).mean(axis=0).astype(np.float32)  # imatrix-like importance
        assert_matches_ggml(w, qtype, col_energy)
        assert_matches_ggml(w, qtype, _importance(rng, w.shape[1]))
        tested += 1
    assert tested > 0


# ---- the float32 building blocks, without libggml ----

def test_nearest_int_is_ggml_bit_trick() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, 4194303.0, -4194303.0], np.float32)
    np.testing.assert_array_equal(aff.nearest_int(v), np.rint(v).astype(np.int32))
    # out of range the trick does not round; the C code then clamps whatever it produced
    assert aff.nearest_int(np.array([np.inf], np.float32))[0] == -0x400000
    assert aff.nearest_int(np.array([5e6], np.float32))[0] != 5_000_000


def test_seq_sum_is_sequential_not_pairwise() -> None:
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 300):
        t = (rng.standard_normal((32, m)) * np.exp(rng.standard_normal((32, m)) * 6)).astype(np.float32)
        acc = np.zeros(m, np.float32)
        for row in t:
            acc = acc + row
        np.testing.assert_array_equal(aff.seq_sum(t).view(np.int32), acc.view(np.int32))
    neg0 = np.full((4, 3), -0.0, np.float32)
    assert not np.signbit(aff.seq_sum(neg0)).any()  # 0.0f + -0.0f
    assert np.signbit(aff.seq_sum_first(neg0)).all()  # -0.0f + -0.0f


def test_seq_min_max_keep_first_zero_sign() -> None:
    x = np.array([[0.0, -0.0, 1.0], [-0.0, 0.0, 2.0], [3.0, 3.0, 0.5]], np.float32)
    assert list(np.signbit(aff.seq_min(x))) == [False, True, False]
    assert list(np.signbit(aff.seq_max(-x))) == [True, False, True]


# ---- the numba fast path against the numpy reference (no libggml needed) ----

# the compiled driver each type calls (with importance, without)
FAST_ENTRY = {T.Q4_1: ("legacy_affine_levels", "legacy_affine_ref"),
              T.Q5_1: ("legacy_affine_levels", "legacy_affine_ref"),
              T.Q4_K: ("k4_levels", "k4_levels"), T.Q5_K: ("k4_levels", "k4_levels"), T.Q2_K: ("q2k_levels", "q2k_levels")}


def _both_paths(monkeypatch, qtype: T, x: np.ndarray, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setattr(affine_numba, "USE_NUMBA", False)
    slow = OURS[qtype](x, imp)
    monkeypatch.setattr(affine_numba, "USE_NUMBA", True)
    return slow, OURS[qtype](x, imp)


def test_numba_kernels_pass_their_self_check() -> None:
    """Where numba is installed the fast path must be on: a kernel that fails its import check falls back to
    numpy silently for users, so here it fails loudly."""
    pytest.importorskip("numba")
    assert affine_numba.AVAILABLE and affine_numba.USE_NUMBA


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("dataset", [*DATASETS, "huge"])
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_numba_path_equals_numpy_path(monkeypatch, qtype: T, dataset: str, with_importance: bool) -> None:
    _require_numba()
    rng = np.random.default_rng(zlib.crc32(f"fast/{qtype.name}/{dataset}".encode()))
    if dataset == "huge":  # sums overflow to inf in float32, as they do in ggml
        x = (_gauss(rng) * np.float32(3e37)).astype(np.float32)
        x[0, :40] = np.float32(3.4e38)
    else:
        x = DATASETS[dataset](rng)
    x = x[:, :768] if qtype in (T.Q4_1, T.Q5_1) else x  # 768: rows of 24 blocks, tiles that end mid-row
    imp = _importance(rng, x.shape[1]) if with_importance else None
    slow, fast = _both_paths(monkeypatch, qtype, np.ascontiguousarray(x), imp)
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("with_importance", [True, False], ids=["imatrix", "plain"])
@pytest.mark.parametrize("qtype", list(OURS), ids=lambda t: t.name)
def test_numba_path_is_used(monkeypatch, qtype: T, with_importance: bool) -> None:
    """USE_NUMBA really switches to the compiled drivers (else the parametrised parity tests prove nothing)."""
    _require_numba()
    calls = []
    name = FAST_ENTRY[qtype][0 if with_importance else 1]
    real = getattr(affine_numba, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(affine_numba, name, spy)
    x = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    imp = np.ones(512, np.float32) if with_importance else None
    monkeypatch.setattr(affine_numba, "USE_NUMBA", False)
    OURS[qtype](x, imp)
    assert not calls
    monkeypatch.setattr(affine_numba, "USE_NUMBA", True)
    OURS[qtype](x, imp)
    assert calls


def _nasty_blocks(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Blocks (n, m) at scales from 1e-38 to 1e30, with zero, signed-zero, constant and one-outlier blocks."""
    x = (rng.standard_t(3, (n, m)) * np.exp(rng.uniform(-85, 69, (1, m)))).astype(np.float32)
    x[:, ::17] = 0.0
    x[::2, 1::17] = -0.0
    x[:, 2::17] = np.float32(0.25)
    x[:, 3::17] = np.float32(-1.5)
    x[5, 4::17] = np.float32(1e4)
    x[:, 5::17] = np.abs(x[:, 5::17])  # min > 0: the offset is clamped to 0
    return x


@pytest.mark.parametrize("n", [16, 32])
def test_compiled_make_qkx_equals_numpy(n: int) -> None:
    _require_numba()
    rng = np.random.default_rng(n)
    x = _nasty_blocks(rng, n, 331)  # 331: five full 64-block tiles and a partial one
    w = rng.gamma(0.7, 1.0, x.shape).astype(np.float32)
    w[:, ::7] = 0.0
    for nmax, rmin, rdelta, nstep, use_mad, ww in ((15, -0.9, 0.05, 36, False, w), (31, -0.5, 0.1, 15, False, w),
                                                  (3, -0.5, 0.1, 15, True, np.abs(x)), (15, -1.0, 0.1, 0, False, w)):
        with np.errstate(all="ignore"):
            want = aff.make_qkx(x, ww, nmax, rmin, rdelta, nstep, use_mad)
        got = affine_numba.make_qkx(x, ww, nmax, rmin, rdelta, nstep, use_mad)
        rows = affine_numba.make_qkx_rows(np.ascontiguousarray(x.T), np.ascontiguousarray(ww.T), nmax, rmin, rdelta,
                                          nstep, use_mad)
        for a, b, c in zip(want, got, (rows[0], rows[1], rows[2].T), strict=True):
            np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8), err_msg=f"nmax {nmax}")
            np.testing.assert_array_equal(c.view(np.uint8), a.view(np.uint8), err_msg=f"rows, nmax {nmax}")


@pytest.mark.parametrize("n, nmax", [(8, 63), (16, 15)])
def test_compiled_make_qp_equals_numpy(n: int, nmax: int) -> None:
    """Also with negative inputs, whose levels C wraps to a byte, and all-zero weights."""
    _require_numba()
    rng = np.random.default_rng(nmax)
    x = _nasty_blocks(rng, n, 400)
    x[:, 200:] = np.abs(x[:, 200:])
    # plus many ordinary blocks, where near-ties between the candidate scales decide the result
    x = np.concatenate([x, np.abs(rng.standard_normal((n, 20000))).astype(np.float32)], axis=1)
    qw = rng.gamma(0.5, 1.0, x.shape).astype(np.float32)
    qw[:, ::9] = 0.0
    with np.errstate(all="ignore"):
        want = aff.make_qp(x, qw, nmax)
    got = affine_numba.make_qp(x, qw, nmax)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))


def test_compiled_requantize_equals_numpy() -> None:
    """The final K-quant pass, including zero scales (levels kept) and negative ones."""
    _require_numba()
    rng = np.random.default_rng(6)
    x = _nasty_blocks(rng, 32, 300).T.copy()
    d = (rng.standard_normal(300) * np.exp(rng.uniform(-80, 60, 300))).astype(np.float32)
    d[::4] = 0.0
    d[1::8] = -0.0
    dm = (rng.standard_normal(300) * np.abs(d)).astype(np.float32)
    for nmax in (3, 15, 31):
        L = rng.integers(0, nmax + 1, x.shape).astype(np.uint8)
        with np.errstate(all="ignore"):
            want = aff.requantize(x.T, d, dm, L.T, nmax).T
        np.testing.assert_array_equal(affine_numba.requantized(x, d, dm, L.copy(), nmax), want)


@pytest.mark.parametrize("nmax", [15, 31])
def test_compiled_legacy_ref_equals_numpy(nmax: int) -> None:
    """Q4_1/Q5_1 without importance, including levels out of byte range (the block spread overflows to inf)."""
    _require_numba()
    rng = np.random.default_rng(nmax)
    x = _nasty_blocks(rng, 32, 300).T.copy()
    x[7, :16] = np.float32(3e38)
    x[7, 16:] = np.float32(-3e38)
    x[8, 0] = np.float32(-3.4e38)
    x[9] = np.arange(32, dtype=np.float32) * np.float32(1.4e-45)  # subnormal scale: 1/d is inf
    with np.errstate(all="ignore"):
        want = aff.legacy_affine_ref(x, nmax)
        got = affine_numba.legacy_affine_ref(x, nmax)
    assert (want[2][9] == 0).all() and not (want[2][9 + 1] == 0).all()  # the inf path ran, and not everywhere
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))


def test_compiled_sums_are_sequential() -> None:
    """seq_row_sums adds in element order from +0.0 (a pairwise or reordered sum would differ here)."""
    _require_numba()
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 256)) * np.exp(rng.standard_normal((5, 256)) * 6)).astype(np.float32)
    for square in (False, True):
        want = aff.seq_sum(np.ascontiguousarray((x * x if square else x).T))
        np.testing.assert_array_equal(affine_numba.seq_row_sums(x, square).view(np.int32), want.view(np.int32))


def test_quantizers_work_without_numba(tmp_path) -> None:
    """Without numba the package imports, USE_NUMBA is False and the numpy path quantizes."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np, quants\n"
        "from quants import affine_numba\n"
        "assert not affine_numba.AVAILABLE and not affine_numba.USE_NUMBA\n"
        "x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)\n"
        "for t in ('q4_1', 'q5_1', 'q4_k', 'q5_k', 'q2_k'):\n"
        "    assert quants.quantize(x, t, np.ones(256, np.float32)).shape[0] == 2\n"
    )
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
