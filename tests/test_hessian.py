"""Input covariance files (`measure.hessian`) and computing them alongside the imatrix (`measure.imatrix_compute`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from measure.hessian import MAP_KEY, HessianError, load_hessians, save_hessians

ROOT = Path(__file__).resolve().parent.parent


def _gram(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    x = rng.standard_normal((n, k))
    return x.T @ x


# --- file round trip --------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    shared = _gram(rng, 100, 64)   # attn_q/k/v read the same input
    down = _gram(rng, 100, 96)
    sums = {"blk.0.attn_q.weight": shared, "blk.0.attn_k.weight": shared.copy(), "blk.0.attn_v.weight": shared,
            "blk.0.ffn_down.weight": down, "blk.0.ffn_gate.weight": shared}
    tokens = {"blk.0.attn_q.weight": 100, "blk.0.attn_k.weight": 100, "blk.0.attn_v.weight": 100,
              "blk.0.ffn_down.weight": 100, "blk.0.ffn_gate.weight": 50}  # same sums, other count: another matrix
    path = save_hessians(tmp_path / "h.safetensors", sums, tokens)
    assert path == tmp_path / "h.safetensors" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]  # no temp file left behind

    h = load_hessians(path)
    assert h.names() == sorted(sums) and all(n in h for n in sums) and "blk.9.attn_q.weight" not in h
    assert h.mapping["blk.0.attn_q.weight"] == h.mapping["blk.0.attn_k.weight"] == h.mapping["blk.0.attn_v.weight"]
    assert len(set(h.mapping.values())) == 3
    assert h.mapping["blk.0.ffn_gate.weight"] != h.mapping["blk.0.attn_q.weight"]
    assert h.tokens == 100

    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(set(h.mapping.values()))  # stored once each
        assert json.loads(f.metadata()[MAP_KEY]) == h.mapping

    for name, n in tokens.items():
        k = sums[name].shape[0]
        got = h.for_tensor(name, k)
        assert got.dtype == np.float32 and got.shape == (k, k)
        np.testing.assert_allclose(got, sums[name] / n, rtol=1e-6)
    assert h.for_tensor("blk.0.attn_output.weight", 64) is None
    assert h.for_tensor("output.weight", 7) is None
    with pytest.raises(HessianError, match=r"64x64, the tensor has 128 columns.*another model") as ei:
        h.for_tensor("blk.0.attn_q.weight", 128)
    assert str(path) in str(ei.value) and "blk.0.attn_q.weight" in str(ei.value)


def test_reading_more_matrices_than_the_cache_holds(tmp_path):
    rng = np.random.default_rng(1)
    sums = {f"blk.{i}.attn_output.weight": _gram(rng, 20, 8) for i in range(7)}
    h = load_hessians(save_hessians(tmp_path / "h.safetensors", sums, dict.fromkeys(sums, 20)))
    for _ in range(2):
        for name in sorted(sums):
            np.testing.assert_allclose(h.for_tensor(name, 8), sums[name] / 20, rtol=1e-6)


def test_fingerprint(tmp_path):
    rng = np.random.default_rng(2)
    m = _gram(rng, 50, 32)
    a = save_hessians(tmp_path / "a.safetensors", {"blk.0.attn_q.weight": m}, {"blk.0.attn_q.weight": 50})
    m2 = m.copy()
    m2[3, 5] += 1.0
    c = save_hessians(tmp_path / "c.safetensors", {"blk.0.attn_q.weight": m2}, {"blk.0.attn_q.weight": 50})
    d = save_hessians(tmp_path / "d.safetensors", {"blk.0.attn_q.weight": m}, {"blk.0.attn_q.weight": 51})
    ha = load_hessians(a)
    fa = ha.fingerprint()
    assert isinstance(fa, str) and len(fa) == 16
    assert fa == ha.fingerprint() == load_hessians(a).fingerprint()  # same file, same fingerprint
    assert len({fa, load_hessians(c).fingerprint(), load_hessians(d).fingerprint()}) == 3
    # the same path rewritten with other content: a freshly loaded file has another fingerprint
    save_hessians(a, {"blk.0.attn_q.weight": m2}, {"blk.0.attn_q.weight": 50})
    assert load_hessians(a).fingerprint() != fa


def test_fingerprint_depends_on_content_only(tmp_path):
    m = _gram(np.random.default_rng(3), 50, 32)
    prints = {load_hessians(save_hessians(tmp_path / f"{i}.safetensors", {"blk.0.attn_q.weight": m},
                                          {"blk.0.attn_q.weight": 50})).fingerprint() for i in range(16)}
    assert len(prints) == 1, f"{len(prints)} different fingerprints for 16 saves of the same covariance"


# --- bad files --------------------------------------------------------------------------------------------

def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(HessianError, match="not found") as ei:
        load_hessians(missing)
    assert "--hessian nope.safetensors" in _one_line(ei, missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(HessianError, match="not a readable covariance file") as ei:
        load_hessians(garbage)
    _one_line(ei, garbage)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(HessianError) as ei:
        load_hessians(empty)
    _one_line(ei, empty)

    from safetensors.numpy import save_file

    no_meta = tmp_path / "plain.safetensors"
    save_file({"cov.0": np.eye(4, dtype=np.float32)}, str(no_meta))
    with pytest.raises(HessianError, match=f"no '{MAP_KEY}' map") as ei:
        load_hessians(no_meta)
    _one_line(ei, no_meta)

    other_meta = tmp_path / "other.safetensors"
    save_file({"cov.0": np.eye(4, dtype=np.float32)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(HessianError, match="map"):
        load_hessians(other_meta)

    bad_json = tmp_path / "badjson.safetensors"
    save_file({"cov.0": np.eye(4, dtype=np.float32)}, str(bad_json), metadata={MAP_KEY: "{not json"})
    with pytest.raises(HessianError) as ei:
        load_hessians(bad_json)
    _one_line(ei, bad_json)

    truncated = tmp_path / "truncated.safetensors"
    save_file({"cov.0": np.eye(4, dtype=np.float32)}, str(truncated),
              metadata={MAP_KEY: json.dumps({"blk.0.attn_q.weight": "cov.0", "blk.0.ffn_down.weight": "cov.1"}),
                        "tokens": "10"})
    with pytest.raises(HessianError, match="cov.1") as ei:
        load_hessians(truncated)
    _one_line(ei, truncated)


# --- computed with the imatrix ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def computed(tiny_model, calibration_text, tmp_path_factory):
    from measure.imatrix_compute import compute_imatrix

    d = tmp_path_factory.mktemp("hess")
    model = tiny_model("llama")
    out = compute_imatrix(model, calibration_text, d / "i.gguf", ctx=128, chunks=2, device="cpu",
                          hessian_output=d / "h.safetensors")
    return model, out, d / "h.safetensors"


def test_compute_imatrix_writes_hessians(computed):
    from measure.imatrix import load_imatrix

    _model, imatrix_path, hpath = computed
    assert imatrix_path.is_file() and hpath.is_file()
    im = load_imatrix(imatrix_path)
    h = load_hessians(hpath)
    assert h.names() == sorted(im.names() + ["output.weight"])  # every dense weight, and the head
    assert h.tokens == 2 * 128
    for layer in (0, 1):
        q, k, v = (h.mapping[f"blk.{layer}.attn_{t}.weight"] for t in "qkv")
        assert q == k == v
        assert h.mapping[f"blk.{layer}.ffn_gate.weight"] == h.mapping[f"blk.{layer}.ffn_up.weight"]
        assert h.mapping[f"blk.{layer}.attn_output.weight"] != q
        assert h.mapping[f"blk.{layer}.ffn_down.weight"] != h.mapping[f"blk.{layer}.ffn_up.weight"]
    assert len(set(h.mapping.values())) == 9  # qkv, attn_output, gate/up, down per layer; the head

    for name in im.names():
        e = im.entries[name]
        assert e.sums.shape[0] == 1 and e.counts.tolist() == [h.tokens]
        n_in = e.sums.shape[1]
        cov = h.for_tensor(name, n_in).astype(np.float64)
        np.testing.assert_allclose(np.diag(cov) * int(e.counts[0]), e.sums[0], rtol=2e-5, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(np.diag(cov), im.importance(name), rtol=2e-5, atol=1e-8, err_msg=name)
        assert np.allclose(cov, cov.T, rtol=1e-6, atol=1e-9), name
        assert (np.abs(cov - np.diag(np.diag(cov))) > 0).any(), name  # a real covariance, not a diagonal
    # positive semi-definite, once per stored matrix. With torch's thread pool, numba's and OpenBLAS's all warm
    # on 2 cores, a 512x512 eigensolve takes seconds instead of milliseconds: solve on one torch thread.
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in {key: n for n, key in h.mapping.items()}.values():
            cov = torch.from_numpy(h.for_tensor(name, _n_in(h, name)).astype(np.float64))
            eig = torch.linalg.eigvalsh(cov)
            assert eig.min() >= -1e-5 * eig.max(), (name, float(eig.min()), float(eig.max()))
    finally:
        torch.set_num_threads(n_threads)


def _n_in(h, name: str) -> int:
    from safetensors import safe_open

    with safe_open(str(h.path), framework="numpy") as f:
        return int(f.get_slice(h.mapping[name]).get_shape()[0])


def test_head_covariance_matches_the_output_imatrix(computed, tiny_model, calibration_text, tmp_path):
    """The head's covariance is collected without changing the imatrix (llama-imatrix leaves the head out
    unless asked); its diagonal is what --process-output would have put in the imatrix."""
    from measure.imatrix import load_imatrix
    from measure.imatrix_compute import compute_imatrix

    model, imatrix_path, hpath = computed
    assert "output.weight" not in load_imatrix(imatrix_path).names()
    with_head = load_imatrix(compute_imatrix(model, calibration_text, tmp_path / "o.gguf", ctx=128, chunks=2,
                                             device="cpu", process_output=True))
    h = load_hessians(hpath)
    n_in = with_head.entries["output.weight"].sums.shape[1]
    cov = h.for_tensor("output.weight", n_in).astype(np.float64)
    np.testing.assert_allclose(np.diag(cov), with_head.importance("output.weight"), rtol=2e-5, atol=1e-8)
    assert h.mapping["output.weight"] not in {h.mapping[n] for n in with_head.names() if n != "output.weight"}


def test_tied_head_covariance_is_filed_under_token_embd(tiny_model, calibration_text, tmp_path):
    """A tied model has no output.weight in its GGUF: the head's matmul reads token_embd, so its covariance
    goes there (and the converter compensates the tied tensor for its role as the head)."""
    from measure.imatrix import load_imatrix
    from measure.imatrix_compute import compute_imatrix

    model = tiny_model("llama", tie_word_embeddings=True)
    im = compute_imatrix(model, calibration_text, tmp_path / "i.gguf", ctx=128, chunks=2, device="cpu",
                         hessian_output=tmp_path / "h.safetensors")
    h = load_hessians(tmp_path / "h.safetensors")
    assert "output.weight" not in h and "token_embd.weight" in h
    assert h.names() == sorted(load_imatrix(im).names() + ["token_embd.weight"])
    hidden = load_imatrix(im).entries["blk.0.attn_q.weight"].sums.shape[1]
    assert h.for_tensor("token_embd.weight", hidden).shape == (hidden, hidden)


def test_computed_hessians_drive_compensation(computed):
    """End to end: the file's matrix for a real tiny-model weight lowers its output error."""
    from safetensors import safe_open

    import quants

    model, _imatrix, hpath = computed
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight").float().numpy()
    h = load_hessians(hpath).for_tensor("blk.0.ffn_down.weight", w.shape[1]).astype(np.float64)
    imp = np.diag(h).astype(np.float32)

    def out_err(y):
        e = (y - w).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", e, h, e))

    plain = out_err(quants.round_trip(w, "q4_0", imp))
    comp = out_err(quants.round_trip(w, "q4_0", imp, hessian=h))
    assert comp < plain, (comp, plain)


def test_compute_without_hessian_output_writes_none(tiny_model, calibration_text, tmp_path):
    from measure.imatrix_compute import compute_imatrix

    compute_imatrix(tiny_model("llama"), calibration_text, tmp_path / "i.gguf", ctx=128, chunks=2, device="cpu")
    assert [p.name for p in tmp_path.iterdir()] == ["i.gguf"]


def test_cli_hessian(computed, calibration_text, tmp_path):
    model, _imatrix, reference_h = computed
    out, hp = tmp_path / "i.gguf", tmp_path / "h.safetensors"
    r = subprocess.run([sys.executable, "-m", "measure", "imatrix", str(model), "--text", str(calibration_text),
                        "-o", str(out), "--ctx", "128", "--chunks", "2", "--device", "cpu", "--hessian", str(hp)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and str(hp) in r.stdout and str(out) in r.stdout
    a, b = load_hessians(hp), load_hessians(reference_h)
    assert a.mapping == b.mapping and a.tokens == b.tokens
    for name, n_in in (("blk.0.attn_q.weight", 256), ("blk.1.ffn_down.weight", 512)):
        np.testing.assert_allclose(a.for_tensor(name, n_in), b.for_tensor(name, n_in), rtol=1e-5, atol=1e-7)


def test_check_reads_shapes_without_loading(tmp_path):
    p = save_hessians(tmp_path / "c.safetensors", {"blk.0.attn_q.weight": np.eye(8)}, {"blk.0.attn_q.weight": 4})
    h = load_hessians(p)
    h.check([("blk.0.attn_q.weight", 8), ("not.covered", 3)])
    assert h._cache == {}  # validation read the header only
    with pytest.raises(HessianError, match="another model") as e:
        h.check([("blk.0.attn_q.weight", 16)])
    assert str(p) in str(e.value)
