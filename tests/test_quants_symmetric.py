"""Parity of our numpy Q6_K, Q3_K, IQ4_NL, IQ4_XS, Q4_0 and Q5_0 quantizers with libggml.

Acceptance (per type, with and without importance): bytes identical to ggml_quantize_chunk on >= 99.9% of
blocks, and where a block differs its importance-weighted squared error is within 1e-6 relative of
ggml's.  On the synthetic sets we require 100% identical blocks.  Real weights: set SMOLLM2_DIR to a
SmolLM2 checkpoint directory (model.safetensors); skipped otherwise.

Every type with an optional numba fast path runs the parity tests twice (fixture `fast_path`): compiled
kernels on, then forced off (the numpy reference), and the two paths are also compared with each other
directly, byte for byte, without libggml.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import quants
from quants import symmetric_search as ss

TYPES = [T.Q6_K, T.Q3_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q5_0]
KINDS = ["gaussian", "student_t", "outliers", "zeros", "tiny", "mixed_scale", "huge"]
# Modules with an optional numba fast path, each switched by its USE_NUMBA flag.
FAST_PATH_MODULES = ("quants.q3_k", "quants.q4_0", "quants.q5_0", "quants.q6_k", "quants.iq4")


def _numba_available() -> bool:
    from quants import symmetric_numba

    return symmetric_numba.AVAILABLE


@pytest.fixture(params=["numba", "numpy"])
def fast_path(request, monkeypatch) -> str:
    """Run a test with the compiled fast paths on ("numba"; skipped without numba) and off ("numpy")."""
    mods = [importlib.import_module(m) for m in FAST_PATH_MODULES]
    if request.param == "numba":
        if not _numba_available():
            pytest.skip("numba not installed (or failed to compile): the numpy paths are tested alone")
    else:
        for m in mods:  # every flag: USE_NUMBA, and Q3_K's USE_NUMBA_IMATRIX for its imatrix path
            for flag in [name for name in vars(m) if name.startswith("USE_NUMBA")]:
                monkeypatch.setattr(m, flag, False)
    return request.param


@pytest.fixture(scope="module")
def ggml(reference):
    """The libggml ctypes binding, or a skip naming what is missing (CI fails in `reference` instead)."""
    from llamacpp import ggml as binding
    from llamacpp.reference import ReferenceNotFound

    try:
        binding.load_libggml(str(reference.libggml_base()))
    except (ReferenceNotFound, OSError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"libggml-base missing in CI: {e}")
        pytest.skip(f"libggml-base not loadable: {e}")
    return binding


def make_rows(kind: str, n_rows: int, n_per_row: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        x = rng.standard_normal((n_rows, n_per_row)) * 0.02
    elif kind == "student_t":
        df = rng.uniform(2.0, 3.0, (n_rows, 1))
        x = rng.standard_t(df, (n_rows, n_per_row)) * 0.01
    elif kind == "outliers":
        x = rng.standard_normal((n_rows, n_per_row)) * 0.02
        idx = rng.choice(x.size, x.size // 300, replace=False)
        x.flat[idx] = rng.standard_normal(idx.size) * rng.choice([5.0, 50.0, 500.0], idx.size)
    elif kind == "zeros":
        x = rng.standard_normal((n_rows, n_per_row))
        x[0] = 0.0  # an all-zero row
        x[1, :256] = 0.0  # an all-zero super-block
        x[2, 32:64] = 0.0  # an all-zero 32-block
        x[3, 16:32] = 0.0  # an all-zero 16-sub-block
        x[4, 1::2] = 0.0  # half zeros
        x[5, :] = -0.0
    elif kind == "tiny":
        x = rng.standard_normal((n_rows, n_per_row)) * 1e-30
        x[1] *= 1e15  # around GROUP_MAX_EPS
    elif kind == "mixed_scale":  # every row its own magnitude, 1e-17 .. 1
        x = rng.standard_normal((n_rows, n_per_row)) * np.exp(rng.uniform(-40, 0, (n_rows, 1)))
    elif kind == "huge":  # x*x overflows to inf in ggml's weights too
        x = rng.standard_normal((n_rows, n_per_row)) * np.exp(rng.uniform(0, 44, (n_rows, 1)))
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def make_importance(n_per_row: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    imp = rng.gamma(0.6, 1.0, n_per_row) * 1e-3
    imp[rng.choice(n_per_row, max(1, n_per_row // 100), replace=False)] = 0.0
    return imp.astype(np.float32)


def ours(qtype: T, rows: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """Our module's function directly (quants.quantize routes Q4_0/Q5_0 without importance to gguf-py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray overflow/invalid warnings leak to users
        return quants._own_quantizer(qtype)(np.ascontiguousarray(rows, dtype=np.float32), imp)


def check_parity(ggml, qtype: T, rows: np.ndarray, imp: np.ndarray | None, *, exact: bool,
                 where: str = "") -> None:
    mine = ours(qtype, rows, imp)
    ref = ggml.ggml_quantize(rows, int(qtype), imp)
    assert mine.shape == ref.shape and mine.dtype == np.uint8
    bs, ts = GGML_QUANT_SIZES[qtype]
    a, b = mine.reshape(-1, ts), ref.reshape(-1, ts)
    bad = np.flatnonzero((a != b).any(axis=1))
    frac = 1.0 - bad.size / a.shape[0]
    if bad.size:
        # importance-weighted squared error of the differing blocks, ours vs ggml's
        n_per_row = rows.shape[1]
        xb = rows.reshape(-1, bs)[bad]
        w = np.ones(bs, np.float32) if imp is None else imp.reshape(-1, bs)[bad % (n_per_row // bs)]
        da = quants.dequantize(a[bad], qtype).reshape(-1, bs)
        db = quants.dequantize(b[bad], qtype).reshape(-1, bs)
        ea = (w * (xb.astype(np.float64) - da) ** 2).sum(axis=1)
        eb = (w * (xb.astype(np.float64) - db) ** 2).sum(axis=1)
        worst = float(np.max((ea - eb) / np.maximum(eb, 1e-300)))
        msg = (f"{qtype.name}{where}: {bad.size}/{a.shape[0]} blocks differ (first {bad[:5].tolist()}), "
               f"{frac:.5%} identical, worst weighted-error excess {worst:.3g}")
        assert frac >= 0.999 and worst <= 1e-6, msg
        assert not exact, msg


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
def test_parity_synthetic(ggml, qtype, kind, with_importance, fast_path):
    n_rows, n_per_row = 8, 1024
    seed = KINDS.index(kind) * 7 + TYPES.index(qtype)
    rows = make_rows(kind, n_rows, n_per_row, seed)
    imp = make_importance(n_per_row, seed) if with_importance else None
    check_parity(ggml, qtype, rows, imp, exact=True)


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_parity_odd_shapes(ggml, qtype, fast_path):
    """One row, one block; and many rows of several blocks (chunk boundaries inside rows)."""
    bs = GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(5)
    for n_rows, n_per_row in ((1, bs), (1, 3 * bs), (300, 3 * bs) if bs == 256 else (700, 9 * bs)):
        rows = (rng.standard_t(2.5, (n_rows, n_per_row)) * 0.03).astype(np.float32)
        imp = make_importance(n_per_row, n_rows)
        check_parity(ggml, qtype, rows, None, exact=True)
        check_parity(ggml, qtype, rows, imp, exact=True)


def _extreme_importance(kind: str, n_per_row: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "all_zero":  # a column never activated: every weight 0
        return np.zeros(n_per_row, np.float32)
    imp = rng.gamma(0.6, 1.0, n_per_row).astype(np.float32)  # "extreme": 1e30 and 1e-30 entries mixed in
    imp[::7] = 1e30
    imp[3::11] = 1e-30
    return imp


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("imp_kind", ["all_zero", "extreme"])
def test_parity_nasty_importance(ggml, qtype, imp_kind, fast_path):
    for kind in ("gaussian", "zeros", "huge"):
        rows = make_rows(kind, 6, 512, 90 + KINDS.index(kind))
        check_parity(ggml, qtype, rows, _extreme_importance(imp_kind, 512), exact=True, where=f" {kind}")


def _smollm2_rows(root: Path, max_rows: int = 128) -> list[tuple[str, np.ndarray]]:
    if not (Path(root) / "model.safetensors").is_file():
        pytest.skip(f"{root} has no model.safetensors")
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    out = []
    with safe_open(str(Path(root) / "model.safetensors"), framework="pt") as f:
        names = [k for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2]
        picked = [k for k in names if ".layers.0." in k or "embed" in k] or names[:8]
        for name in picked[:8]:  # every projection shape: 576-wide and 1536-wide (mlp.down_proj) rows
            t = f.get_slice(name)[:max_rows]
            out.append((name, t.to(torch.float32).numpy()))
    return out


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_parity_real_weights(ggml, qtype, smollm2, fast_path):
    bs = GGML_QUANT_SIZES[qtype][0]
    tested = 0
    for i, (name, rows) in enumerate(_smollm2_rows(smollm2)):
        if rows.shape[1] % bs:
            continue  # e.g. 576-wide rows cannot be K-quantized (llama-quantize falls back too)
        imp = make_importance(rows.shape[1], i)
        check_parity(ggml, qtype, rows, None, exact=False, where=f" {name}")
        check_parity(ggml, qtype, rows, imp, exact=False, where=f" {name} (imatrix)")
        tested += 1
    if not tested:
        pytest.skip(f"no SmolLM2 tensor has rows that are a multiple of {bs}")


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
def test_round_trip_gguf_and_ggml_dequantize_agree(ggml, qtype, with_importance, fast_path):
    n_rows, n_per_row = 6, 512
    rows = make_rows("gaussian", n_rows, n_per_row, 11)
    imp = make_importance(n_per_row, 11) if with_importance else None
    q = ours(qtype, rows, imp)
    by_gguf = quants.dequantize(q, qtype)
    by_ggml = ggml.ggml_dequantize(q, int(qtype), n_per_row)
    assert by_gguf.shape == rows.shape
    np.testing.assert_array_equal(by_gguf, by_ggml)
    # and the reconstruction is a quantization of the input, not noise
    rel = np.linalg.norm(by_gguf - rows) / np.linalg.norm(rows)
    assert rel < {T.Q6_K: 0.03, T.Q5_0: 0.06, T.Q3_K: 0.2}.get(qtype, 0.11), rel


@pytest.mark.reference
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_public_api_dispatch(ggml, qtype, fast_path):
    """quants.quantize (input checks, reshaping, gguf-py routing) gives ggml's bytes for 3-D input too."""
    rows = make_rows("gaussian", 4, 512, 3)
    imp = make_importance(512, 3)
    for w in (None, imp):
        got = quants.quantize(rows.reshape(2, 2, 512), qtype, w)
        assert got.shape == (2, 2, quants.row_bytes(qtype, 512))
        np.testing.assert_array_equal(got.reshape(4, -1), ggml.ggml_quantize(rows, int(qtype), w))


# ---- building blocks against literal (per-element, per-block) ports of the C helpers; no libggml needed


def _c_best_index_int8(values: np.ndarray, x: np.float32) -> int:
    if x <= values[0]:
        return 0
    if x >= values[-1]:
        return len(values) - 1
    ml, mu = 0, len(values) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - values[mu - 1]) < np.float32(values[mu] - x) else mu


def test_iq4_best_index_matches_binary_search():
    vals = ss.IQ4NL_VALUES.astype(np.float32)
    mids = (vals[:-1] + vals[1:]) / 2
    near = np.concatenate([np.nextafter(mids, -np.inf), mids, np.nextafter(mids, np.inf)])
    rng = np.random.default_rng(0)
    xs = np.concatenate([
        near, vals, np.nextafter(vals, -np.inf), np.nextafter(vals, np.inf),
        rng.uniform(-140, 130, 4000), rng.standard_normal(1000) * 1e-20,
        [0.0, -0.0, 1e30, -1e30, np.inf, -np.inf, np.nan],
    ]).astype(np.float32)
    got = ss.iq4_best_index(xs)
    want = [_c_best_index_int8(vals, x) for x in xs]
    np.testing.assert_array_equal(got, want)


def test_seq_sum_is_sequential():
    rng = np.random.default_rng(1)
    for n, m in ((16, 1), (32, 1), (256, 3), (16, 500)):
        t = (rng.standard_normal((n, m)) * np.exp(rng.uniform(-10, 10, (n, m)))).astype(np.float32)
        acc = np.zeros(m, np.float32)
        for i in range(n):
            acc = acc + t[i]
        np.testing.assert_array_equal(ss.seq_sum(t), acc)
    rows = (rng.standard_normal((3, 3000)) * 10).astype(np.float32)
    acc = np.zeros(3, np.float32)
    for j in range(rows.shape[1]):
        acc = acc + rows[:, j] * rows[:, j]
    np.testing.assert_array_equal(ss.row_sum_sq(rows), acc)


def _c_make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.float32, list[int]]:
    """Literal scalar port of make_qx_quants(rmse_type=1) in float32, for cross-checking the vector form."""
    f = np.float32
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < ss.GROUP_MAX_EPS:
        return f(0), [0] * len(x)

    def level(isc, v):
        return max(-nmax, min(nmax - 1, int(ss.nearest_int(np.array([f(isc * v)]))[0])))

    def sums(isc):
        slx = sl2 = f(0)
        for v, wi in zip(x, w):
            li = f(level(isc, v))
            slx = f(slx + f(f(wi * v) * li))
            sl2 = f(sl2 + f(f(wi * li) * li))
        return slx, sl2

    iscale = f(f(-nmax) / mx)
    L = [nmax + level(iscale, v) for v in x]
    sumlx, suml2 = sums(iscale)
    scale = f(sumlx / suml2) if suml2 else f(0)
    best = f(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = f(-f(f(nmax) + f(f(0.1) * f(step))) / mx)
        slx, sl2 = sums(iscale)
        if sl2 > 0 and f(slx * slx) > f(best * sl2):
            L = [nmax + level(iscale, v) for v in x]
            scale = f(slx / sl2)
            best = f(scale * slx)
    return scale, L


def test_make_qx_quants_matches_scalar_port():
    rng = np.random.default_rng(2)
    x = (rng.standard_t(2.5, (16, 40)) * 0.1).astype(np.float32)
    x[:, 3] = 0.0
    x[4, 7] = np.nan  # nearest_int(NaN) is 0 in C
    x[5, 8] = np.inf
    w = (rng.gamma(0.5, 1.0, (16, 40))).astype(np.float32)
    w[:, 5] = 0.0
    for nmax in (4, 8, 32):
        scale, L = ss.make_qx_quants(x, nmax, w)
        for b in range(x.shape[1]):
            with np.errstate(invalid="ignore"):  # inf * 0 in the NaN/inf blocks, as in C
                s_ref, L_ref = _c_make_qx_quants(x[:, b], nmax, w[:, b])
            same = scale[b] == s_ref or (np.isnan(scale[b]) and np.isnan(s_ref))
            assert same and L[:, b].tolist() == L_ref, (nmax, b)


# ---- Q3_K has optional numba fast paths with and without importance; the numpy path stays the reference


@pytest.mark.reference
@pytest.mark.parametrize("kind", KINDS)
def test_q3_k_numpy_path_parity(ggml, kind, monkeypatch):
    from quants import q3_k

    monkeypatch.setattr(q3_k, "USE_NUMBA", False)
    rows = make_rows(kind, 8, 1024, 40 + KINDS.index(kind))
    check_parity(ggml, T.Q3_K, rows, None, exact=True)


@pytest.mark.parametrize("kind", KINDS)
def test_q3_k_numba_path_equals_numpy_path(kind):
    from quants import q3_k

    if not q3_k.USE_NUMBA:
        pytest.skip("numba not installed (or failed to compile): Q3_K uses its numpy path only")
    rows = make_rows(kind, 16, 1024, 60 + KINDS.index(kind))
    xb = rows.reshape(-1, 256)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(q3_k._ref_blocks_numba(xb), q3_k._ref_blocks(xb))


def _q3_k_both_paths(rows: np.ndarray, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    from quants import q3_k

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither path may leak overflow/invalid warnings
        return q3_k._quantize(rows, imp, fast=True), q3_k._quantize(rows, imp, fast=False)


@pytest.mark.parametrize("kind", KINDS)
def test_q3_k_imatrix_numba_path_equals_numpy_path(kind):
    """13 rows of 1536 (78 super-blocks): many tiles of 4 super-blocks, the last one partial."""
    _require_numba()
    seed = 400 + KINDS.index(kind)
    rows = make_rows(kind, 13, 1536, seed)
    fast, ref = _q3_k_both_paths(rows, make_importance(1536, seed))
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("imp_kind", ["all_zero", "extreme"])
def test_q3_k_imatrix_numba_path_equals_numpy_path_nasty_importance(imp_kind, monkeypatch):
    """Huge rows with extreme importance overflow some sub-block scales to inf/NaN: the scale-of-scales
    search then takes numpy for those super-blocks only, the compiled search for the others."""
    _require_numba()
    from quants import q3_k

    splits = []
    real = q3_k._scale_of_scales

    def spy(scales, sw):
        finite = np.isfinite(scales).all(axis=1)
        splits.append((int(finite.sum()), int((~finite).sum())))
        return real(scales, sw)

    monkeypatch.setattr(q3_k, "_scale_of_scales", spy)
    for kind in ("gaussian", "zeros", "tiny", "huge"):
        rows = make_rows(kind, 6, 768, 500 + KINDS.index(kind))
        fast, ref = _q3_k_both_paths(rows, _extreme_importance(imp_kind, 768))
        np.testing.assert_array_equal(fast, ref, err_msg=kind)
    if imp_kind == "extreme":  # the mixed case was really exercised
        assert any(ok and bad for ok, bad in splits), splits


def test_q3_k_fast_paths_enabled_and_taken(monkeypatch):
    """With numba both Q3_K flags passed their import-time checks and the public quantizer does go through
    the compiled imatrix kernel (so the "numba" parity runs test it, not numpy twice)."""
    _require_numba()
    from quants import q3_k, symmetric_numba

    assert q3_k.USE_NUMBA and q3_k.USE_NUMBA_IMATRIX

    class Taken(Exception):
        pass

    def taken(*args, **kwargs):
        raise Taken

    monkeypatch.setattr(symmetric_numba, "q3k_levels", taken)
    rows = make_rows("gaussian", 2, 512, 1)
    with pytest.raises(Taken):
        quants._own_quantizer(T.Q3_K)(rows, make_importance(512, 1))


def test_q3_k_no_rows(fast_path):
    """Zero rows give zero blocks of the right row length, on either path, with and without importance."""
    for imp in (None, make_importance(512, 0)):
        got = ours(T.Q3_K, np.zeros((0, 512), np.float32), imp)
        assert got.shape == (0, quants.row_bytes(T.Q3_K, 512)) and got.dtype == np.uint8


# ---- the numba fast paths (symmetric_numba) against the numpy paths, byte for byte; no libggml needed

# type -> (module, its quantize(rows, importance, *, fast) switch)
FAST_QUANTIZERS = {
    T.Q4_0: ("quants.q4_0", "_quantize"),
    T.Q5_0: ("quants.q5_0", "_quantize"),
    T.Q6_K: ("quants.q6_k", "_quantize"),
    T.IQ4_NL: ("quants.iq4", "_quantize_nl"),
    T.IQ4_XS: ("quants.iq4", "_quantize_xs"),
}


def _both_paths(qtype: T, rows: np.ndarray, imp: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    module, fn = FAST_QUANTIZERS[qtype]
    quantize = getattr(importlib.import_module(module), fn)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither path may leak overflow/invalid warnings
        return quantize(rows, imp, fast=True), quantize(rows, imp, fast=False)


def _require_numba() -> None:
    if not _numba_available():
        pytest.skip("numba not installed (or failed to compile): only the numpy paths exist")


@pytest.mark.parametrize("qtype", list(FAST_QUANTIZERS), ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "imatrix"])
def test_numba_path_equals_numpy_path(qtype, kind, with_importance):
    """13 rows of 1536: several tiles of 64 blocks, the last one partial, for every block size."""
    _require_numba()
    seed = 200 + KINDS.index(kind)
    rows = make_rows(kind, 13, 1536, seed)
    imp = make_importance(1536, seed) if with_importance else None
    fast, ref = _both_paths(qtype, rows, imp)
    np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("qtype", list(FAST_QUANTIZERS), ids=lambda t: t.name)
@pytest.mark.parametrize("imp_kind", ["all_zero", "extreme"])
def test_numba_path_equals_numpy_path_nasty_importance(qtype, imp_kind):
    _require_numba()
    for kind in ("gaussian", "zeros", "tiny", "huge"):
        rows = make_rows(kind, 6, 768, 300 + KINDS.index(kind))
        fast, ref = _both_paths(qtype, rows, _extreme_importance(imp_kind, 768))
        np.testing.assert_array_equal(fast, ref, err_msg=kind)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", list(FAST_QUANTIZERS), ids=lambda t: t.name)
def test_numba_path_equals_numpy_path_real_weights(qtype, smollm2):
    _require_numba()
    bs = GGML_QUANT_SIZES[qtype][0]
    tested = 0
    for i, (name, rows) in enumerate(_smollm2_rows(smollm2)):
        if rows.shape[1] % bs:
            continue
        for imp in (None, make_importance(rows.shape[1], i)):
            fast, ref = _both_paths(qtype, rows, imp)
            np.testing.assert_array_equal(fast, ref, err_msg=f"{name} importance={imp is not None}")
        tested += 1
    assert tested


def test_fast_paths_enabled_and_taken(monkeypatch):
    """With numba, every module passed its import-time self-check, and the public quantizers do go through
    the compiled kernels (so the "numba" parity runs above test them, not numpy twice)."""
    _require_numba()
    from quants import symmetric_numba

    for module in {m for m, _ in FAST_QUANTIZERS.values()}:
        assert importlib.import_module(module).USE_NUMBA, f"{module}: numba self-check failed, numpy used"

    class Taken(Exception):
        pass

    def taken(*args, **kwargs):
        raise Taken

    for kernel in ("legacy_quantize", "q6k_levels", "iq4_nl", "iq4_xs"):
        monkeypatch.setattr(symmetric_numba, kernel, taken)
    rows = make_rows("gaussian", 2, 512, 1)
    imp = make_importance(512, 1)
    for qtype in FAST_QUANTIZERS:
        for w in (imp, None) if qtype in (T.Q6_K, T.IQ4_NL, T.IQ4_XS) else (imp,):
            with pytest.raises(Taken):
                quants._own_quantizer(qtype)(rows, w)


def test_self_check_rejects_a_wrong_or_broken_fast_path():
    _require_numba()
    from quants import symmetric_numba

    def wrong(rows, imp, *, fast):
        return np.zeros(4, np.uint8) + (1 if fast else 0)

    def broken(rows, imp, *, fast):
        if fast:
            raise RuntimeError("no kernel")
        return np.zeros(4, np.uint8)

    def right(rows, imp, *, fast):
        return np.zeros(4, np.uint8)

    assert not symmetric_numba.self_check(wrong, 256)
    assert not symmetric_numba.self_check(broken, 256)
    assert symmetric_numba.self_check(right, 256)


@pytest.mark.parametrize("nmax", [4, 8, 16, 32])
@pytest.mark.parametrize("n", [16, 32])
def test_numba_make_qx_quants_equals_numpy(nmax, n):
    """The compiled make_qx_quants on nasty blocks: zeros, -0, around GROUP_MAX_EPS, huge (x*x = inf),
    zero and infinite weights, inf/NaN values (numpy fallback), many partial tiles."""
    _require_numba()
    from quants import symmetric_numba

    rng = np.random.default_rng(nmax * 100 + n)
    m = 1000
    x = (rng.standard_t(2.5, (n, m)) * np.exp(rng.uniform(-40, 40, m))).astype(np.float32)
    x[:, 0] = 0.0
    x[:, 1] = -0.0
    x[:, 2] = 1e-15
    x[:3, 3] = 3e38
    x[:, 4] *= np.float32(1e-30)
    w = rng.gamma(0.5, 1.0, (n, m)).astype(np.float32)
    w[:, 5] = 0.0
    w[2, 6] = np.inf
    x_bad = x.copy()  # Q3_K's scale-of-scales search can see overflowed scales (numpy fallback)
    x_bad[4, 7] = np.nan
    x_bad[5, 8] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            for xx, ww in ((x, w), (x, x * x), (x_bad, w)):
                s_ref, l_ref = ss.make_qx_quants(xx, nmax, ww)
                s_fast, l_fast = symmetric_numba.make_qx_quants(xx, nmax, ww)
                np.testing.assert_array_equal(s_fast.view(np.int32), s_ref.view(np.int32))
                np.testing.assert_array_equal(l_fast, l_ref)


def test_numba_make_qx_quants_matches_scalar_port():
    _require_numba()
    from quants import symmetric_numba

    rng = np.random.default_rng(2)
    x = (rng.standard_t(2.5, (16, 40)) * 0.1).astype(np.float32)
    x[:, 3] = 0.0
    w = (rng.gamma(0.5, 1.0, (16, 40))).astype(np.float32)
    w[:, 5] = 0.0
    for nmax in (4, 8, 32):
        scale, L = symmetric_numba.make_qx_quants(x, nmax, w)
        for b in range(x.shape[1]):
            s_ref, L_ref = _c_make_qx_quants(x[:, b], nmax, w[:, b])
            same = scale[b] == s_ref or (np.isnan(scale[b]) and np.isnan(s_ref))
            assert same and L[:, b].tolist() == L_ref, (nmax, b)


@pytest.mark.parametrize("qtype", list(FAST_QUANTIZERS), ids=lambda t: t.name)
def test_no_rows(qtype, fast_path):
    """Zero rows give zero blocks of the right row length, on either path, with and without importance."""
    n_per_row = 512
    for imp in (None, make_importance(n_per_row, 0)):
        got = ours(qtype, np.zeros((0, n_per_row), np.float32), imp)
        assert got.shape == (0, quants.row_bytes(qtype, n_per_row))
