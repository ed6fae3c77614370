"""measure.imatrix: reading llama-imatrix's GGUF and .dat files, combining, writing, and importance values that
make our quantizers reproduce llama-quantize --imatrix byte for byte."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from measure.imatrix import Imatrix, ImatrixEntry, ImatrixError, load_imatrix, save_imatrix_dat, save_imatrix_gguf

ROOT = Path(__file__).resolve().parent.parent


def _upstream_convert(model_dir: Path, out: Path, reference) -> Path:
    src = reference.prefix / "src"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    res = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                          "--outfile", str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _llama_imatrix(reference, model_gguf: Path, text: Path, out: Path, *extra: str) -> Path:
    res = subprocess.run([str(reference.tool("llama-imatrix")), "-m", str(model_gguf), "-f", str(text), "-c", "128",
                          "--chunks", "8", "-t", "2", "-o", str(out), *extra], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def ref_files(tiny_model, reference, calibration_text, tmp_path_factory):
    """{arch: (f32 model gguf, imatrix.gguf, imatrix.dat)} made by upstream's converter and llama-imatrix."""
    out = {}
    d = tmp_path_factory.mktemp("imat")
    for arch in ("llama", "mixtral"):
        g = _upstream_convert(tiny_model(arch), d / f"{arch}.gguf", reference)
        ig = _llama_imatrix(reference, g, calibration_text, d / f"{arch}.imatrix.gguf")
        idat = _llama_imatrix(reference, g, calibration_text, d / f"{arch}.imatrix.dat", "--output-format", "dat")
        out[arch] = (g, ig, idat)
    return out


# --- pure file-format tests (no reference build needed) ------------------------------------------------

def _entry(rng, n=64, n_mat=1, zero=()):
    counts = rng.integers(50, 500, size=n_mat)
    counts[list(zero)] = 0
    sums = (rng.random((n_mat, n)) * counts[:, None]).astype(np.float32)
    sums[list(zero)] = 0
    return ImatrixEntry(sums, counts.astype(np.int64))


def test_gguf_roundtrip_and_values(tmp_path):
    rng = np.random.default_rng(0)
    ents = {"blk.0.attn_q.weight": _entry(rng), "blk.0.ffn_up_exps.weight": _entry(rng, 32, 4, zero=(2,))}
    p = save_imatrix_gguf(tmp_path / "a.gguf", ents, datasets=["x.txt"], chunk_count=7, chunk_size=128)
    m = load_imatrix(p)
    assert m.names() == sorted(ents) and m.chunks == 7 and m.chunk_size == 128 and m.datasets == ["x.txt"]
    dense = m.importance("blk.0.attn_q.weight")
    e = ents["blk.0.attn_q.weight"]
    assert dense.shape == (64,) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, e.sums[0] / np.float32(e.counts[0]))
    moe = m.importance("blk.0.ffn_up_exps.weight")
    assert moe.shape == (4, 32)
    np.testing.assert_array_equal(moe[2], np.ones(32, np.float32))  # never routed: llama-quantize uses ones
    cov = m.coverage("blk.0.ffn_up_exps.weight")
    assert cov.partial and cov.zero == (2,) and "never routed: 2" in cov.describe()
    assert [c.name for c in m.flagged()] == ["blk.0.ffn_up_exps.weight"]
    assert m.importance("nope") is None
    # importance_for follows llama-quantize: 3-D tensors per expert, size mismatch = another model
    assert m.importance_for("blk.0.ffn_up_exps.weight", (4, 10, 32)).shape == (4, 32)
    with pytest.raises(ImatrixError, match="another model"):
        m.importance_for("blk.0.attn_q.weight", (10, 128))
    assert m.importance_for("token_embd.weight", (10, 128)) is None


def test_dat_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    m0 = Imatrix({"blk.1.attn_k.weight": _entry(rng, 32)}, ["cal.txt"], 3, 64)
    p = save_imatrix_dat(tmp_path / "a.dat", m0)
    m = load_imatrix(p)
    assert m.is_legacy and m.chunks == 3 and m.datasets == ["cal.txt"]
    np.testing.assert_allclose(m.importance("blk.1.attn_k.weight"), m0.importance("blk.1.attn_k.weight"), rtol=1e-6)


def test_combine_modes(tmp_path):
    a = {"t.weight": ImatrixEntry(np.array([[2.0, 4.0]], np.float32), np.array([2]))}
    b = {"t.weight": ImatrixEntry(np.array([[3.0, 3.0]], np.float32), np.array([1]))}
    pa = save_imatrix_gguf(tmp_path / "a.gguf", a, datasets=["a"], chunk_count=1, chunk_size=2)
    pb = save_imatrix_gguf(tmp_path / "b.gguf", b, datasets=["b"], chunk_count=1, chunk_size=2)
    np.testing.assert_allclose(load_imatrix([pa, pb], "mean").importance("t.weight"), [2.0, 2.5])
    np.testing.assert_allclose(load_imatrix([pa, pb], "max").importance("t.weight"), [3.0, 3.0])
    w = load_imatrix([pa, pb], "weighted")
    np.testing.assert_allclose(w.importance("t.weight"), [5 / 3, 7 / 3], rtol=1e-6)
    assert w.datasets == ["a", "b"] and w.chunks == 2
    c = {"t.weight": ImatrixEntry(np.ones((1, 3), np.float32), np.array([1]))}
    pc = save_imatrix_gguf(tmp_path / "c.gguf", c, chunk_count=1, chunk_size=2)
    with pytest.raises(ImatrixError, match="different sizes"):
        load_imatrix([pa, pc])


def test_corrupt_files_one_line_errors(tmp_path):
    rng = np.random.default_rng(2)
    p = save_imatrix_gguf(tmp_path / "ok.gguf", {"blk.0.attn_q.weight": _entry(rng, 256)}, chunk_count=1, chunk_size=8)
    data = p.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 4):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ImatrixError) as ei:
            load_imatrix(bad)
        assert str(bad) in str(ei.value) and "\n" not in str(ei.value)
    m0 = Imatrix({"blk.0.attn_q.weight": _entry(rng, 256)}, ["d"], 1, 8)
    d = save_imatrix_dat(tmp_path / "ok.dat", m0).read_bytes()
    for cut in (2, 30, len(d) - 1100):
        bad = tmp_path / f"cut{cut}.dat"
        bad.write_bytes(d[:cut])
        with pytest.raises(ImatrixError, match=str(bad)):
            load_imatrix(bad)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(struct.pack("<i", 10**8) + b"x" * 100)
    with pytest.raises(ImatrixError, match="junk.bin"):
        load_imatrix(junk)
    with pytest.raises(ImatrixError, match="not found"):
        load_imatrix(tmp_path / "missing.gguf")


# --- against the reference llama-imatrix / llama-quantize ------------------------------------------------

@pytest.mark.reference
def test_reads_reference_files(ref_files):
    for arch, (_, ig, idat) in ref_files.items():
        g, d = load_imatrix(ig), load_imatrix(idat)
        assert g.chunks == 8 and g.chunk_size == 128 and g.dataset.endswith("calibration.txt")
        assert d.is_legacy and d.chunks == 8
        assert g.names() == d.names() and all(n.startswith("blk.") for n in g.names())
        for n in g.names():
            a, b = g.importance(n), d.importance(n)
            np.testing.assert_allclose(a.reshape(-1), b, rtol=1e-5)
            if arch == "mixtral" and "_exps" in n:
                assert a.shape == (4, g.entries[n].sums.shape[1])
            cov = g.coverage(n)
            assert cov.n_mat in (1, 4) and not cov.empty


def _quantize_like_llama(model_gguf: Path, imatrix: Path, qtype: str, out: Path, reference) -> Path:
    res = subprocess.run([str(reference.tool("llama-quantize")), "--pure", "--imatrix", str(imatrix),
                          str(model_gguf), str(out), qtype, "2"], capture_output=True, text=True)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    return out


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_K", "IQ4_XS", "Q5_0"])
def test_importance_reproduces_llama_quantize(ref_files, reference, qtype, tmp_path):
    """Quantizing with importance_for() gives exactly the bytes llama-quantize --imatrix writes (GGUF and .dat)."""
    from gguf import GGUFReader

    import quants

    checked = 0
    for arch, (g, ig, idat) in ref_files.items():
        src = {t.name: t for t in GGUFReader(g).tensors}
        for imfile in (ig, idat) if arch == "mixtral" else (ig,):
            im = load_imatrix(imfile)
            q = _quantize_like_llama(g, imfile, qtype, tmp_path / f"{arch}-{imfile.suffix}-{qtype}.gguf", reference)
            for t in GGUFReader(q).tensors:
                if t.tensor_type.name != qtype or t.name not in im:
                    continue
                w = np.asarray(src[t.name].data, dtype=np.float32)
                imp = im.importance_for(t.name, w.shape)
                if w.ndim == 3:
                    ours = np.stack([quants.quantize(w[e], qtype, imp[e]) for e in range(w.shape[0])])
                else:
                    ours = quants.quantize(w, qtype, imp)
                assert np.array_equal(ours.reshape(-1), np.asarray(t.data).reshape(-1)), (arch, imfile.name, t.name)
                checked += 1
    assert checked >= 20
