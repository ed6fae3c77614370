"""The model's own samples (`measure.sample`) and covariances from several texts (`measure imatrix --text A --text B`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def samples(tiny_model, tmp_path_factory):
    from measure.sample import sample_text

    model = tiny_model("llama")
    d = tmp_path_factory.mktemp("samples")
    seen = []
    out = sample_text(model, d / "s.txt", tokens=300, ctx=128, seed=3, batch=2, device="cpu",
                      progress=lambda done, total: seen.append((done, total)))
    return model, out, seen


def test_sample_writes_the_requested_tokens(samples):
    from transformers import AutoTokenizer

    model, out, seen = samples
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["s.txt"]  # no temp file left
    assert seen == [(2, 3), (3, 3)]  # ceil(300 / 128) samples, two at a time
    text = out.read_text(encoding="utf-8")
    parts = text.rstrip("\n").split("\n\n")
    assert len(parts) >= 3  # a sample may itself hold blank lines; never fewer than the samples
    # each sample is 128 tokens of the model (BOS and the random first token included), none cut short by an
    # end-of-text token. Decoding then re-tokenizing can split pieces (a random tiny model writes stray bytes),
    # never merge many: the text holds at least the tokens asked for
    n = len(AutoTokenizer.from_pretrained(str(model))(text, add_special_tokens=False)["input_ids"])
    assert n >= 0.9 * 3 * 128, n


def test_sample_is_deterministic_for_a_seed(samples, tmp_path):
    from measure.sample import sample_text

    model, out, _ = samples
    again = sample_text(model, tmp_path / "a.txt", tokens=300, ctx=128, seed=3, batch=2, device="cpu")
    assert again.read_text() == out.read_text()
    other = sample_text(model, tmp_path / "b.txt", tokens=300, ctx=128, seed=4, batch=2, device="cpu")
    assert other.read_text() != out.read_text()


def test_imatrix_from_two_texts_is_the_sum_of_each(samples, calibration_text, tmp_path):
    """Both sources count alike: the combined sums, counts and covariances are those of each text added up."""
    from measure.hessian import load_hessians
    from measure.imatrix import load_imatrix
    from measure.imatrix_compute import compute_imatrix

    model, sample_file, _ = samples
    kw = dict(ctx=64, chunks=2, device="cpu")
    a = compute_imatrix(model, calibration_text, tmp_path / "a.gguf", hessian_output=tmp_path / "a.st", **kw)
    b = compute_imatrix(model, sample_file, tmp_path / "b.gguf", hessian_output=tmp_path / "b.st", **kw)
    both = compute_imatrix(model, [calibration_text, sample_file], tmp_path / "ab.gguf",
                           hessian_output=tmp_path / "ab.st", **kw)
    ia, ib, iab = (load_imatrix(p) for p in (a, b, both))
    assert iab.chunk_count == 4 and iab.datasets == [str(calibration_text), str(sample_file)]
    assert sorted(iab.names()) == sorted(ia.names())
    for name in iab.names():
        np.testing.assert_allclose(iab.entries[name].sums, ia.entries[name].sums + ib.entries[name].sums,
                                   rtol=1e-5, err_msg=name)
        assert iab.entries[name].counts.tolist() == [256]
    ha, hb, hab = (load_hessians(tmp_path / f"{k}.st") for k in ("a", "b", "ab"))
    assert hab.tokens == 256
    n_in = ia.entries["blk.0.attn_q.weight"].sums.shape[1]
    for name in ("blk.0.attn_q.weight", "output.weight"):
        np.testing.assert_allclose(hab.for_tensor(name, n_in),
                                   (ha.for_tensor(name, n_in) + hb.for_tensor(name, n_in)) / 2, rtol=1e-4, atol=1e-7)


def test_sample_errors_are_one_line(tiny_model, tmp_path):
    model = tiny_model("llama")
    for args, needle in ((["--temperature", "0"], "--temperature 0"), (["--tokens", "0"], "--tokens 0"),
                         (["--ctx", "4"], "ctx at least 8")):
        r = subprocess.run([sys.executable, "-m", "measure", "sample", str(model), "-o", str(tmp_path / "s.txt"),
                            *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "measure", "sample", str(tmp_path / "nope"), "-o",
                        str(tmp_path / "s.txt")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr, r.stderr
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in model.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy2(f, no_tok / f.name)
    r = subprocess.run([sys.executable, "-m", "measure", "sample", str(no_tok), "-o", str(tmp_path / "s.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot load the tokenizer" in r.stderr and str(no_tok) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s.txt").exists()


def test_cli_sample_then_imatrix_from_both(tiny_model, calibration_text, tmp_path):
    model = tiny_model("llama")
    s = tmp_path / "s.txt"
    r = subprocess.run([sys.executable, "-m", "measure", "sample", str(model), "-o", str(s), "--tokens", "256",
                        "--ctx", "128", "--device", "cpu", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {s}" in r.stdout and s.stat().st_size > 0
    out, hp = tmp_path / "i.gguf", tmp_path / "h.safetensors"
    r = subprocess.run([sys.executable, "-m", "measure", "imatrix", str(model), "--text", str(calibration_text),
                        "--text", str(s), "--ctx", "64", "--chunks", "2", "-o", str(out), "--hessian", str(hp),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from measure.hessian import load_hessians
    from measure.imatrix import load_imatrix

    assert load_imatrix(out).chunk_count == 4 and load_hessians(hp).tokens == 256


def test_imatrix_missing_second_text_fails_before_any_work(tiny_model, calibration_text, tmp_path):
    """Every --text is checked up front: a typo in the second one must not cost the first one's tokenizing."""
    model = tiny_model("llama")
    out, hp = tmp_path / "i.gguf", tmp_path / "h.safetensors"
    r = subprocess.run([sys.executable, "-m", "measure", "imatrix", str(model), "--text", str(calibration_text),
                        "--text", str(tmp_path / "typo.txt"), "--ctx", "64", "--chunks", "2", "-o", str(out),
                        "--hessian", str(hp), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and "typo.txt: calibration text not found" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not hp.exists()
