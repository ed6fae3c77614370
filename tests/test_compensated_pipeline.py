"""--hessian through the pipeline: measure records the compensated encoding's output error, the probe round-trips
what the converter writes, the converter's bytes are quants.compensate's, and llama.cpp reads the file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import quants
from measure.hessian import load_hessians

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def covariances(tiny_model, calibration_text, tmp_path_factory):
    """(model dir, torch imatrix, covariance file) of the tiny llama."""
    from measure.imatrix_compute import compute_imatrix

    model = tiny_model("llama")
    d = tmp_path_factory.mktemp("cov")
    im = compute_imatrix(model, calibration_text, d / "imatrix.gguf", ctx=64, hessian_output=d / "cov.safetensors")
    return model, im, d / "cov.safetensors"


def _weights(model: Path) -> dict[str, np.ndarray]:
    import catalog

    return {i.name: np.asarray(w, dtype=np.float32) for i, w in catalog.iter_tensors(model) if i.quantizable}


def _run(*args, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_converter_writes_compensated_blocks(covariances, tmp_path, reference, evaluation_text):
    from test_convert import perplexity_runs, read_kv, read_tensors

    from measure.imatrix import load_imatrix

    model, im, cov = covariances
    out = tmp_path / "c.gguf"
    p = _run(ROOT / "convert_hf_to_gguf_strategy.py", model, "--outtype", "q4_0", "--imatrix", im,
             "--hessian", cov, "--outfile", out)
    assert "error-compensated" in p.stderr
    h, imat, w = load_hessians(cov), load_imatrix(im), _weights(model)
    got = read_tensors(out)
    compensated = set()
    for name, (tname, data) in got.items():
        if name not in w or tname in ("F32", "F16", "BF16") or w[name].ndim != 2:
            continue
        hm = h.for_tensor(name, w[name].shape[1])
        imp = imat.importance_for(name, w[name].shape)
        want = quants.quantize(w[name], tname, imp, hessian=hm) if hm is not None else quants.quantize(w[name], tname, imp)
        assert data == want.tobytes(), name
        if hm is not None:
            compensated.add(name)
            assert data != quants.quantize(w[name], tname, imp).tobytes(), f"{name}: compensation changed nothing"
    assert len(compensated) >= 7 * 2 + 1  # every dense block matrix of the 2 layers, and the head
    assert "output.weight" in compensated
    assert read_kv(out)["quantize.strategy.covariance_file"] == cov.name
    perplexity_runs(reference, out, evaluation_text)  # llama.cpp loads and evaluates it


def test_converter_rejects_a_covariance_of_another_model(covariances, tmp_path):
    from measure.hessian import save_hessians

    model, _, _ = covariances
    cov = tmp_path / "other.safetensors"  # a model whose blk.0.ffn_down reads 48 inputs
    save_hessians(cov, {"blk.0.ffn_down.weight": np.eye(48)}, {"blk.0.ffn_down.weight": 10})
    out = tmp_path / "x.gguf"
    p = _run(ROOT / "convert_hf_to_gguf_strategy.py", model, "--outtype", "q4_0", "--hessian", cov,
             "--outfile", out, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and cov.name in last and "another model" in last
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
    p = _run(ROOT / "convert_hf_to_gguf_strategy.py", model, "--outtype", "q4_0", "--hessian", tmp_path / "nope",
             "--outfile", out, check=False)
    assert p.returncode != 0 and "covariance file not found" in p.stderr.strip().splitlines()[-1]


def test_measure_records_output_error(covariances, tmp_path):
    from measure.imatrix import load_imatrix
    from measure.roundtrip import ErrorSums

    model, im, cov = covariances
    db_c, db_p = tmp_path / "c.db", tmp_path / "p.db"
    _run("-m", "measure", model, "--imatrix", im, "--hessian", cov, "--db", db_c, "--types", "Q4_0,Q8_0",
         "--no-progress", "--workers", "1")
    _run("-m", "measure", model, "--imatrix", im, "--db", db_p, "--types", "Q4_0,Q8_0", "--no-progress",
         "--workers", "1")

    def rows(db):
        con = sqlite3.connect(db)
        return {(t, q): w for t, q, w in con.execute("SELECT tensor, qtype, wmse FROM results")}

    c, pl = rows(db_c), rows(db_p)
    h, imat, w = load_hessians(cov), load_imatrix(im), _weights(model)
    name = "blk.0.ffn_down.weight"
    hm = h.for_tensor(name, w[name].shape[1])
    imp = imat.importance_for(name, w[name].shape)
    acc = ErrorSums()
    acc.add(w[name], quants.round_trip(w[name], "Q4_0", imp, hessian=hm), imp, hm)
    assert c[name, "Q4_0"] == pytest.approx(acc.result().wmse, rel=1e-6)
    # the output error under H is what compensation lowers: lower than plain rounding's, scored the same way
    plain = ErrorSums()
    plain.add(w[name], quants.round_trip(w[name], "Q4_0", imp), imp, hm)
    assert acc.result().wmse < plain.result().wmse
    # with a diagonal H the weighted error is the importance-weighted one
    d = ErrorSums()
    d.add(w[name], quants.round_trip(w[name], "Q4_0", imp), imp, np.diag(np.diag(hm)))
    e = ErrorSums()
    e.add(w[name], quants.round_trip(w[name], "Q4_0", imp), np.diag(hm))
    assert d.result().wmse == pytest.approx(e.result().wmse, rel=1e-5)
    assert set(c) == set(pl)
    # another covariance file is another run: the compensated db is not the plain one reused
    meta = dict(sqlite3.connect(db_c).execute("SELECT key, value FROM meta"))
    assert "+cov:" in meta["imatrix_fingerprint"]


def test_measure_refuses_ggml_backend_with_hessian(covariances, tmp_path):
    model, im, cov = covariances
    p = _run("-m", "measure", model, "--imatrix", im, "--hessian", cov, "--db", tmp_path / "x.db",
             "--quantizer", "ggml", "--no-progress", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--hessian" in p.stderr.strip().splitlines()[-1]


@pytest.mark.reference
def test_probe_round_trips_what_the_converter_writes(covariances, tmp_path, evaluation_text):
    """A probe with the covariances == the torch engine on the converted file (same blocks, same forward)."""
    from verify.probe import ProbeSession
    from verify.torch_engine import TorchEngine

    model, im, cov = covariances
    out = tmp_path / "c.gguf"
    _run(ROOT / "convert_hf_to_gguf_strategy.py", model, "--outtype", "q4_0", "--imatrix", im, "--hessian", cov,
         "--outfile", out)
    from measure.imatrix import load_imatrix

    s = ProbeSession(model, evaluation_text, n_ctx=64, n_chunks=2, hessians=load_hessians(cov), cache_dir=tmp_path)
    imat = load_imatrix(im)
    names = [n for n, w in s.originals.items() if w.ndim == 2]
    from test_convert import read_tensors

    types = {n: t for n, (t, _) in read_tensors(out).items()}
    assign = {n: types[n] for n in names if n in types and types[n] not in ("F32", "F16", "BF16")}
    imp = {n: imat.importance_for(n, tuple(s.originals[n].shape)) for n in assign if n in imat}
    r = s.probe(assign, importance={n: v for n, v in imp.items() if v is not None})
    te = TorchEngine(emulate_ggml=False)
    te.run_base(s.gguf, evaluation_text, 64, 2, tmp_path / "b.kld")
    ref = te.compare(out, tmp_path / "b.kld", 64)
    assert r.kld_mean > 0 and r.kld_mean == pytest.approx(ref.kld_mean, rel=2e-3)
