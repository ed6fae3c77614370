"""measure: round-trip error math, the sqlite store (incl. a real SIGKILL + resume), the CLI, bad input, and our
torch imatrix against the reference llama-imatrix."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import quants
from measure.db import DBError, MeasurementDB
from measure.imatrix import ImatrixEntry, load_imatrix, save_imatrix_gguf
from measure.roundtrip import DEFAULT_TYPES, error_stats, measure_tensor, parse_types, quantize_tensor

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "measure", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# --- round-trip math -------------------------------------------------------------------------------------

def test_error_stats_by_hand():
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    r = np.array([[1.5, 2.0], [3.0, 3.0]], np.float32)
    e = error_stats(w, r, None)
    assert e.rmse == pytest.approx(np.sqrt((0.25 + 1.0) / 4))
    assert e.max_abs_err == pytest.approx(1.0)
    assert e.wmse == pytest.approx(1.25 / 4)
    assert e.rel_err == pytest.approx(np.sqrt(1.25) / np.sqrt(30))
    assert e.cos == pytest.approx((1.5 + 4 + 9 + 12) / (np.sqrt(30) * np.sqrt(1.5**2 + 4 + 9 + 9)))
    # importance weights columns: col 0 err^2 = 0.25 (weight 3), col 1 err^2 = 1 (weight 1), 2 rows each
    e = error_stats(w, r, np.array([3.0, 1.0], np.float32))
    assert e.wmse == pytest.approx((3 * 0.25 + 1 * 1.0) / (2 * 3 + 2 * 1))
    # per-expert importance for 3-D tensors
    w3, r3 = np.stack([w, w]), np.stack([r, w])
    e = error_stats(w3, r3, np.array([[3.0, 1.0], [5.0, 5.0]], np.float32))
    assert e.wmse == pytest.approx((3 * 0.25 + 1.0) / (6 + 2 + 20))


def test_measure_tensor_uses_importance_and_sizes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    imp = rng.random(256).astype(np.float32) + 0.01
    m = measure_tensor("blk.0.ffn_down.weight", w, "Q4_K", imp, tensor_class="ffn_down", layer=0)
    assert m.n_bytes == 8 * 144 and m.bpw == pytest.approx(4.5) and m.n_params == w.size
    deq = quants.dequantize(quants.quantize(w, "Q4_K", imp), "Q4_K").reshape(w.shape)
    assert m.rmse == pytest.approx(float(np.sqrt(np.mean((deq.astype(np.float64) - w) ** 2))))
    assert 0.9 < m.cos < 1.0 and 0 < m.rel_err < 0.2
    without = measure_tensor("x", w, "Q4_K", None)
    assert without.rmse != m.rmse  # the importance changes the quantization
    assert measure_tensor("x", w[:, :96], "Q4_K", None) is None  # 96 is not a multiple of 256: not applicable
    assert measure_tensor("x", w[:, :96], "Q8_0", None) is not None
    # 3-D experts: each expert quantized with its own importance slice
    w3 = rng.standard_normal((2, 4, 256)).astype(np.float32)
    imp3 = rng.random((2, 256)).astype(np.float32) + 0.01
    q = quantize_tensor(w3, "IQ4_XS", imp3)
    assert np.array_equal(q[1], quants.quantize(w3[1], "IQ4_XS", imp3[1]))
    assert not np.array_equal(q[1], quants.quantize(w3[1], "IQ4_XS", imp3[0]))


def test_parse_types():
    assert parse_types(None) == list(DEFAULT_TYPES) and len(DEFAULT_TYPES) == 14
    assert parse_types("q8_0, Q4_k,iq4_xs,Q8_0") == ["Q8_0", "Q4_K", "IQ4_XS"]
    with pytest.raises(quants.QuantInputError, match="unknown"):
        parse_types("q9_z")


# --- database --------------------------------------------------------------------------------------------

def test_db_roundtrip_and_refusals(tmp_path):
    from measure.records import Measurement

    db = MeasurementDB(tmp_path / "m.db")
    key = db.bind(model_fp="aaa", model_dir="/m/a", imatrix_fp=None, imatrix_paths=[], quant_version="q1",
                  types=["Q8_0"])
    m = Measurement("blk.0.attn_q.weight", "Q8_0", 10, 11, 8.8, 0.1, 0.2, 0.01, 0.05, 0.99, "attn_q", 0)
    db.put_result(key, m.tensor, "Q8_0", m)
    db.put_result(key, m.tensor, "Q4_K", None)
    assert db.measurements() == [m] and db.not_applicable() == [(m.tensor, "Q4_K")]
    assert db.done(key) == {(m.tensor, "Q8_0"), (m.tensor, "Q4_K")}
    assert db.model_info()["model_dir"] == "/m/a"
    with pytest.raises(DBError, match="another model .*/m/a"):
        db.bind(model_fp="bbb", model_dir="/m/b", imatrix_fp=None, imatrix_paths=[], quant_version="q1", types=[])
    db.close()
    ro = MeasurementDB(tmp_path / "m.db", readonly=True)
    assert ro.measurements() == [m]
    out = ro.export(tmp_path / "m.json")
    assert json.loads(out.read_text())["measurements"][0]["tensor"] == m.tensor
    with pytest.raises(DBError, match="writable"):
        MeasurementDB("/proc/measure-test.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite" * 100)
    with pytest.raises(DBError, match="bad.db"):
        MeasurementDB(bad)


def test_db_written_before_the_sample_column_still_reads(tmp_path):
    from measure.records import Measurement

    path = tmp_path / "old.db"
    db = MeasurementDB(path)
    key = db.bind(model_fp="aaa", model_dir="/m/a", imatrix_fp=None, imatrix_paths=[], quant_version="q1",
                  types=["Q8_0"])
    m = Measurement("blk.0.attn_q.weight", "Q8_0", 10, 11, 8.8, 0.1, 0.2, 0.01, 0.05, 0.99, "attn_q", 0)
    db.put_result(key, m.tensor, "Q8_0", m)
    db.close()
    con = sqlite3.connect(path)  # what a database of the first schema looks like
    con.execute("ALTER TABLE results DROP COLUMN sample")
    con.commit()
    con.close()
    assert MeasurementDB(path, readonly=True).measurements() == [m]
    assert MeasurementDB(path).measurements() == [m]  # a writable open migrates it
    con = sqlite3.connect(path)
    assert "sample" in {r[1] for r in con.execute("PRAGMA table_info(results)")}


# --- the whole thing on tiny models ------------------------------------------------------------------------

def test_cli_measure_export_inspect(tiny_model, tmp_path):
    model = tiny_model("llama")
    db = tmp_path / "m.db"
    r = _cli(model, "--types", "q8_0,Q4_K,iq4_nl", "--db", db, "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    with MeasurementDB(db) as d:
        ms = d.measurements()
        import catalog

        quant = [i for i in catalog.list_tensors(model) if i.quantizable]
        assert len(ms) == 3 * len(quant) and {m.qtype for m in ms} == {"Q8_0", "Q4_K", "IQ4_NL"}
        by = {(m.tensor, m.qtype): m for m in ms}
        for i in quant:  # more bits, less error
            assert by[(i.name, "Q8_0")].rmse < by[(i.name, "Q4_K")].rmse
            assert by[(i.name, "Q8_0")].n_bytes == quants.row_bytes("Q8_0", i.shape[-1]) * i.n_params // i.shape[-1]
    r = _cli(model, "--types", "q8_0,Q4_K,iq4_nl", "--db", db, "--no-progress")
    assert r.returncode == 0 and "0 computed" in r.stdout and f"{3 * len(quant)} already done" in r.stdout
    r = _cli("export", "--db", db, "-o", tmp_path / "m.csv")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "m.csv").read_text().strip().splitlines()) == 1 + 3 * len(quant)
    r = _cli("inspect", model)
    assert r.returncode == 0 and "blk.0.attn_q.weight" in r.stdout and "attn_q" in r.stdout


def test_sigkill_then_resume(tiny_model, tmp_path):
    """kill -9 mid-run, re-run: finished rows are kept as they were (not recomputed), the rest are added."""
    model = tiny_model("llama")
    db = tmp_path / "k.db"
    types = "Q8_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K,IQ4_XS"
    p = subprocess.Popen([sys.executable, "-m", "measure", str(model), "--types", types, "--db", str(db),
                          "--workers", "2", "--no-progress"], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n_before = 0
    deadline = time.time() + 300
    try:
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=1) as c:
                        n_before = c.execute("SELECT count(*) FROM results").fetchone()[0]
                except sqlite3.Error:
                    continue
                if n_before >= 10:
                    break
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the process group we started: the CLI and its workers
        p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with sqlite3.connect(db) as c:
        before = dict(((t, q), cr) for t, q, cr in c.execute("SELECT tensor, qtype, created FROM results"))
    assert len(before) >= 10
    r = _cli(model, "--types", types, "--db", db, "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    import catalog

    n_quant = sum(1 for i in catalog.list_tensors(model) if i.quantizable)
    with sqlite3.connect(db) as c:
        after = dict(((t, q), cr) for t, q, cr in c.execute("SELECT tensor, qtype, created FROM results"))
    assert len(after) == 7 * n_quant
    assert all(after[k] == v for k, v in before.items())  # nothing finished was recomputed
    assert f"{len(before)} already done" in r.stdout and f"{7 * n_quant - len(before)} computed" in r.stdout


def test_bad_inputs(tiny_model, tmp_path, calibration_text):
    llama, mixtral = tiny_model("llama"), tiny_model("mixtral")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text((llama / "config.json").read_text())
    r = _cli(empty, "--db", tmp_path / "x.db")
    assert r.returncode != 0 and "no *.safetensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # imatrix of another model: right names, wrong sizes
    other = save_imatrix_gguf(tmp_path / "other.gguf", {"blk.0.attn_q.weight": ImatrixEntry(
        np.ones((1, 128), np.float32), np.array([10]))}, datasets=["x"], chunk_count=1, chunk_size=10)
    r = _cli(llama, "--imatrix", other, "--db", tmp_path / "x.db", "--types", "q8_0")
    assert r.returncode != 0 and "another model" in r.stderr and "other.gguf" in r.stderr
    # a db written by another model
    db = tmp_path / "one.db"
    assert _cli(llama, "--db", db, "--types", "q8_0", "--no-progress").returncode == 0
    r = _cli(mixtral, "--db", db, "--types", "q8_0", "--no-progress")
    assert r.returncode != 0 and "another model" in r.stderr and str(llama.name) in r.stderr
    r = _cli(llama, "--db", "/proc/nope.db", "--types", "q8_0")
    assert r.returncode != 0 and "writable" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text(calibration_text.read_text()[:300])
    r = _cli("imatrix", llama, "--text", short, "-o", tmp_path / "i.gguf", "--ctx", "128")
    assert r.returncode != 0 and "short.txt" in r.stderr and "tokens" in r.stderr
    assert not (tmp_path / "i.gguf").exists()


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_torch_imatrix_matches_llama_imatrix(arch, tiny_model, reference, calibration_text, tmp_path):
    from test_imatrix import _llama_imatrix, _upstream_convert

    model = tiny_model(arch)
    g = _upstream_convert(model, tmp_path / "m.gguf", reference)
    theirs = load_imatrix(_llama_imatrix(reference, g, calibration_text, tmp_path / "ref.gguf"))
    r = _cli("imatrix", model, "--text", calibration_text, "-o", tmp_path / "ours.gguf", "--ctx", "128",
             "--chunks", "8")
    assert r.returncode == 0, r.stderr
    ours = load_imatrix(tmp_path / "ours.gguf")
    assert ours.names() == theirs.names() and ours.chunks == 8 and ours.chunk_size == 128
    for n in theirs.names():
        a, b = ours.importance(n), theirs.importance(n)
        assert a.shape == b.shape
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99, n
        assert np.array_equal(ours.entries[n].counts, theirs.entries[n].counts), n  # same tokens, same routing
    q = subprocess.run([str(reference.tool("llama-quantize")), "--imatrix", str(tmp_path / "ours.gguf"), str(g),
                        str(tmp_path / "q.gguf"), "Q4_K_M", "2"], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr[-1500:]
    assert "loaded" in q.stdout and "importance matrix entries" in q.stdout


@pytest.mark.reference
def test_ggml_backend_gives_identical_measurements(reference):
    """--quantizer ggml is only an accelerator: same bytes, hence the same numbers, as the converter's quants."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 16, 512)).astype(np.float32)
    imp = (rng.random((2, 512)) + 0.01).astype(np.float32)
    for t in ("Q8_0", "Q6_K", "Q4_K", "Q4_1", "IQ4_XS", "Q2_K"):
        a = measure_tensor("blk.0.ffn_up_exps.weight", w, t, imp, backend="numpy")
        b = measure_tensor("blk.0.ffn_up_exps.weight", w, t, imp, backend="ggml")
        assert a == b, t


def test_row_sampling_is_exact_per_row_and_close_overall():
    """Rows quantize independently, so sampled rows carry exactly their full-tensor errors; totals are estimates."""
    from measure.roundtrip import sample_rows
    from quants import round_trip

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((2048, 256)) * rng.random(256) * 3).astype(np.float32)
    imp = (rng.random(256) + 0.01).astype(np.float32)
    full = round_trip(w, "Q4_K", imp)
    part = sample_rows(w, 0.25, "blk.3.ffn_up.weight")
    assert part.shape == (512, 256)
    rows = [int(np.flatnonzero((w == r).all(axis=1))[0]) for r in part[:20]]
    np.testing.assert_array_equal(round_trip(part, "Q4_K", imp)[:20], full[rows])
    a = measure_tensor("blk.3.ffn_up.weight", w, "Q4_K", imp)
    b = measure_tensor("blk.3.ffn_up.weight", w, "Q4_K", imp, sample=0.25)
    assert a.sample == 1.0 and b.sample == pytest.approx(0.25)
    assert (a.n_bytes, a.bpw, a.n_params) == (b.n_bytes, b.bpw, b.n_params)
    assert b.rmse == pytest.approx(a.rmse, rel=0.05) and b.wmse == pytest.approx(a.wmse, rel=0.05)
    assert b.max_abs_err <= a.max_abs_err
    small = rng.standard_normal((100, 256)).astype(np.float32)  # fewer rows than the minimum: measured whole
    assert measure_tensor("x", small, "Q8_0", None, sample=0.1).sample == 1.0


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q5_1", "Q4_0", "IQ4_NL", "Q4_K", "Q6_K", "IQ4_XS"])
def test_chunked_round_trip_equals_whole_tensor(qtype):
    """Measurement scores a tensor a chunk of rows at a time: the bytes (so the numbers) must be those of the
    whole-tensor quantization the converter does, and the statistics those of the whole error array."""
    from measure.roundtrip import CHUNK_WEIGHTS, chunked_errors, error_stats, quantize_tensor

    rng = np.random.default_rng(5)
    n = 512
    rows = CHUNK_WEIGHTS // n * 2 + 37  # two full chunks and a partial one
    w = (rng.standard_t(3, (rows, n)) * 0.02).astype(np.float32)
    imp = rng.gamma(0.5, 1.0, n).astype(np.float32)
    whole = quantize_tensor(w, qtype, imp)
    step = CHUNK_WEIGHTS // n
    parts = np.concatenate([quantize_tensor(w[s:s + step], qtype, imp) for s in range(0, rows, step)])
    assert np.array_equal(whole, parts)
    r = quants.dequantize(whole, qtype).reshape(w.shape)
    err = r.astype(np.float64) - w
    e = chunked_errors(w, qtype, imp)
    assert e.rmse == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)
    assert e.max_abs_err == pytest.approx(np.abs(err).max(), rel=1e-6)
    assert e.wmse == pytest.approx(float((err**2 @ imp).sum() / (imp.sum() * rows)), rel=1e-5)
    e2 = error_stats(w, r, imp)
    for f in ("rmse", "max_abs_err", "wmse", "rel_err", "cos"):
        assert getattr(e, f) == pytest.approx(getattr(e2, f), rel=1e-6)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a one-core machine's BLAS pool has one thread anyway")
def test_measurement_workers_run_one_blas_thread_each() -> None:
    """A forked worker inherits the parent's BLAS pool sized for every core; beside the other workers it only
    competes for them (measure/run.py's _worker_init resizes it)."""
    from concurrent.futures import ProcessPoolExecutor

    from measure.run import _worker_init

    assert max(_blas_threads()) > 1  # the parent's pool, which a fork inherits
    with ProcessPoolExecutor(max_workers=1, initializer=_worker_init) as pool:
        in_worker = pool.submit(_blas_threads).result()
    assert in_worker and set(in_worker) == {1}  # every BLAS the worker has loaded (torch may bring another)
