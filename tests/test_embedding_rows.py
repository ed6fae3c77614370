"""Per-row covariances of a tied embedding: the statistics (`measure.embedding_rows`), their place in the
covariance file (`measure.hessian`), the encoding (`quants.compensate.quantize_compensated_rows`) and the
converter writing it in a file llama.cpp runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import quants
from measure.embedding_rows import EmbeddingRowStats
from measure.hessian import HessianError, load_hessians, save_hessians
from quants.compensate import RowCovariances, quantize_compensated, quantize_compensated_rows

ROOT = Path(__file__).resolve().parent.parent


def _stats(rng: np.random.Generator, *, positions: int = 30, d: int = 16, vocab: int = 50, topk: int = 6,
           n_rows: int = 10) -> EmbeddingRowStats:
    top = np.stack([rng.choice(vocab, topk, replace=False) for _ in range(positions)]).astype(np.int32)
    g = rng.standard_normal((d, d))
    counts = rng.integers(0, 4, vocab).astype(np.float32)
    counts[:5] = 0  # tokens that never occur...
    top[top < 5] = 5  # ...and never appear among the probable ones: no evidence, never chosen
    return EmbeddingRowStats(hidden=rng.standard_normal((positions, d)).astype(np.float32), top_tokens=top,
                             top_weights=rng.uniform(0, 0.25, (positions, topk)).astype(np.float32),
                             lookup_fisher=(g @ g.T / d).astype(np.float32), counts=counts, n_rows=n_rows)


# --- the statistics -----------------------------------------------------------------------------------------

def test_row_covariance_is_the_documented_sum():
    rng = np.random.default_rng(0)
    st = _stats(rng, n_rows=60)
    d = st.hidden.shape[1]
    shared = (st.hidden.T.astype(np.float64) @ st.hidden) / len(st.hidden)
    rc = st.row_covariances(shared, lookup_weight=2.0, shrink=3.0)
    g = st.lookup_fisher.astype(np.float64)
    mass = np.zeros(50)
    want = {v: 2.0 * st.counts[v] * g + 3.0 * shared for v in range(50)}
    for t in range(len(st.hidden)):  # brute force over every (position, kept token)
        for v, w in zip(st.top_tokens[t], st.top_weights[t], strict=True):
            h = st.hidden[t].astype(np.float64)
            want[v] = want[v] + float(w) * np.outer(h, h)
            mass[v] += w
    score = mass + 2.0 * st.counts * np.trace(g) / np.trace(shared)
    assert set(rc.rows.tolist()) == {v for v in range(50) if score[v] > 0}  # n_rows exceeds the evidence
    assert not set(rc.rows.tolist()) & set(range(5))
    assert list(score[rc.rows]) == sorted(score[rc.rows], reverse=True)
    for v in rc.rows:
        got = rc.covariance(int(v))
        assert got.shape == (d, d)
        np.testing.assert_allclose(got, want[int(v)], rtol=1e-6, atol=1e-9)

    full = st.row_covariances(shared)
    st.n_rows = 10
    capped = st.row_covariances(shared)
    assert capped.rows.tolist() == full.rows[:10].tolist()  # the 10 with the most weight


def test_row_statistics_of_another_width_are_refused():
    from measure.embedding_rows import EmbeddingRowsError

    st = _stats(np.random.default_rng(1))
    with pytest.raises(EmbeddingRowsError, match="16 wide.*8x8"):
        st.row_covariances(np.eye(8))


# --- the encoding -------------------------------------------------------------------------------------------

def _anisotropic(rng: np.random.Generator, k: int) -> np.ndarray:
    """A covariance concentrated on a few directions, unlike the shared one."""
    basis = rng.standard_normal((k, 4))
    return basis @ basis.T * 50 + np.eye(k) * 0.1


@pytest.mark.parametrize("qtype", ["Q5_1", "Q4_0", "Q4_K"])
def test_listed_rows_take_their_own_covariance(qtype):
    rng = np.random.default_rng(2)
    k = 256
    w = rng.standard_normal((40, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((400, k))
    shared = x.T @ x / 400
    own = {v: _anisotropic(rng, k) for v in range(3, 40, 2)}
    rc = RowCovariances(rows=np.array(sorted(own)), covariance=lambda v: own[v])

    base = quantize_compensated(w, qtype, None, shared)
    got = quantize_compensated_rows(w, qtype, None, shared, rc)
    assert np.array_equal(quants.quantize(w, qtype, hessian=shared, row_covariances=rc), got)
    for v in range(40):
        if v in own:
            want = quantize_compensated(w[v:v + 1], qtype, np.diag(own[v]).astype(np.float32), own[v])[0]
            assert np.array_equal(got[v], want), v
        else:
            assert np.array_equal(got[v], base[v]), v  # the shared encoding, byte for byte

    def err(q: np.ndarray, v: int) -> float:
        e = (quants.dequantize(q[v:v + 1], qtype)[0] - w[v]).astype(np.float64)
        return float(e @ own[v] @ e)

    # each listed row's error under its own covariance is what that row's encoding aims at
    assert sum(err(got, v) for v in own) < 0.8 * sum(err(base, v) for v in own)


def test_row_covariance_errors():
    w = np.zeros((4, 32), dtype=np.float32)
    rc = RowCovariances(rows=np.array([7]), covariance=lambda v: np.eye(32))
    with pytest.raises(quants.QuantInputError, match="row 7, the tensor has 4.*another model"):
        quants.quantize(w, "Q5_1", hessian=np.eye(32), row_covariances=rc, name="token_embd.weight")
    with pytest.raises(quants.QuantInputError, match="shared input covariance"):
        quants.quantize(w, "Q5_1", row_covariances=rc)
    # float types are never compensated, rows or not
    assert np.array_equal(quants.quantize(w, "F16", hessian=np.eye(32), row_covariances=rc),
                          quants.quantize(w, "F16"))


# --- the covariance file ------------------------------------------------------------------------------------

def test_file_round_trip_keeps_the_fingerprint(tmp_path):
    rng = np.random.default_rng(3)
    st = _stats(rng)
    sums = {"token_embd.weight": st.hidden.T.astype(np.float64) @ st.hidden}
    plain = load_hessians(save_hessians(tmp_path / "a.safetensors", sums, {"token_embd.weight": 30}))
    rows = load_hessians(save_hessians(tmp_path / "b.safetensors", sums, {"token_embd.weight": 30},
                                       {"token_embd.weight": st}))
    assert plain.row_covariances("token_embd.weight", 16) is None
    assert rows.rows == {"token_embd.weight": {"prefix": "rows.0", "n_rows": 10}}
    # measurement and probes use the shared matrix only: same identity for their results
    assert rows.fingerprint() == plain.fingerprint()
    rc = rows.row_covariances("token_embd.weight", 16)
    want = st.row_covariances(plain.for_tensor("token_embd.weight", 16))
    assert rc.rows.tolist() == want.rows.tolist()
    np.testing.assert_allclose(rc.covariance(int(rc.rows[0])), want.covariance(int(want.rows[0])))
    rows.check([("token_embd.weight", 16)])
    with pytest.raises(HessianError, match="another model"):
        rows.check([("token_embd.weight", 8)])


def test_truncated_row_statistics_are_a_one_line_error(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    st = _stats(np.random.default_rng(4))
    p = save_hessians(tmp_path / "c.safetensors", {"token_embd.weight": np.eye(16)}, {"token_embd.weight": 1},
                      {"token_embd.weight": st})
    with safe_open(str(p), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(p))
    del tensors["rows.0.top_weights"]
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(HessianError, match=r"rows\.0\.top_weights.*truncated or corrupt") as e:
        load_hessians(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


# --- collected from a tiny tied model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied(tiny_model, calibration_text, tmp_path_factory):
    """(tied model dir, torch imatrix, covariance file with 100 rows' statistics, one without)."""
    from measure.imatrix_compute import compute_imatrix

    model = tiny_model("llama", tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("rows")
    im = compute_imatrix(model, calibration_text, d / "i.gguf", ctx=128, chunks=2, device="cpu",
                         hessian_output=d / "rows.safetensors", embedding_rows=100)
    compute_imatrix(model, calibration_text, d / "j.gguf", ctx=128, chunks=2, device="cpu",
                    hessian_output=d / "shared.safetensors")
    return model, im, d / "rows.safetensors", d / "shared.safetensors"


def test_collected_statistics(tied):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, _im, rows_path, shared_path = tied
    h, plain = load_hessians(rows_path), load_hessians(shared_path)
    assert h.mapping == plain.mapping and h.fingerprint() == plain.fingerprint()
    with safe_open(str(rows_path), framework="numpy") as f:
        st = EmbeddingRowStats.from_tensors(f.get_tensor, h.rows["token_embd.weight"]["prefix"], 100)
    n_pos, d = 2 * 128, 256
    assert st.hidden.shape == (n_pos, d) and st.top_tokens.shape == (n_pos, 256) and st.counts.shape == (512,)
    assert st.counts.sum() == n_pos
    # the hidden states are the head's input: their covariance is the file's shared matrix for the tied tensor
    np.testing.assert_allclose(st.hidden.T.astype(np.float64) @ st.hidden / n_pos,
                               h.for_tensor("token_embd.weight", d), rtol=1e-4, atol=1e-6)
    # p(1-p) of the tied head, largest first
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    e = m.get_input_embeddings().weight.detach().double().numpy()
    for t in (0, 77, n_pos - 1):
        logits = st.hidden[t].astype(np.float64) @ e.T
        p = np.exp(logits - logits.max())
        p /= p.sum()
        curv = p * (1 - p)
        np.testing.assert_allclose(st.top_weights[t], curv[st.top_tokens[t]], rtol=2e-3, atol=1e-8)
        np.testing.assert_allclose(np.sort(st.top_weights[t])[::-1], np.sort(curv)[::-1][:256], rtol=2e-3,
                                   atol=1e-8)
    g = st.lookup_fisher.astype(np.float64)
    assert np.allclose(g, g.T, rtol=1e-5, atol=1e-12) and np.trace(g) > 0
    assert np.linalg.eigvalsh(g).min() >= -1e-6 * np.linalg.eigvalsh(g).max()
    assert len(h.row_covariances("token_embd.weight", d).rows) == 100


def test_converter_encodes_the_rows(tied, tmp_path, reference, evaluation_text):
    from test_convert import perplexity_runs, read_tensors

    import catalog
    from measure.imatrix import load_imatrix

    model, im, rows_path, shared_path = tied
    outs = {}
    for label, cov in (("rows", rows_path), ("shared", shared_path)):
        outs[label] = tmp_path / f"{label}.gguf"
        p = subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf_strategy.py"), str(model), "--outtype",
                            "q5_1", "--imatrix", str(im), "--hessian", str(cov), "--outfile", str(outs[label])],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("+100 rows by own covariance" in p.stderr) == (label == "rows"), label
    got, plain = read_tensors(outs["rows"]), read_tensors(outs["shared"])
    w = {i.name: np.asarray(x, dtype=np.float32) for i, x in catalog.iter_tensors(model) if i.quantizable}
    tname, data = got["token_embd.weight"]
    h = load_hessians(rows_path)
    shared = h.for_tensor("token_embd.weight", 256)
    imp = load_imatrix(im).importance_for("token_embd.weight", w["token_embd.weight"].shape)
    want = quants.quantize(w["token_embd.weight"], tname, imp, hessian=shared,
                           row_covariances=h.row_covariances("token_embd.weight", 256))
    assert data == want.tobytes()
    assert data != plain["token_embd.weight"][1]
    assert {n for n in got if got[n] != plain[n]} == {"token_embd.weight"}  # nothing else changes
    perplexity_runs(reference, outs["rows"], evaluation_text)


def test_imatrix_refuses_rows_for_an_untied_model_or_without_a_covariance_file(tiny_model, calibration_text,
                                                                               tmp_path):
    untied = tiny_model("llama")
    base = [sys.executable, "-m", "measure", "imatrix", str(untied), "--text", str(calibration_text), "-o",
            str(tmp_path / "i.gguf"), "--ctx", "128", "--chunks", "1", "--device", "cpu", "--embedding-rows", "10"]
    for extra, msg in (([], "pass --hessian FILE too"),
                       (["--hessian", str(tmp_path / "h.safetensors")], "is for a tied embedding")):
        r = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and msg in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "h.safetensors").exists() and not (tmp_path / "i.gguf").exists()
