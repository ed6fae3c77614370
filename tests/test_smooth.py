"""measure.smooth: the smoothed checkpoint computes the same function, its imatrix is the one the smoothed model
produces, activation outliers shrink, and llama.cpp runs the converted file with less activation-rounding loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_model

from measure.smooth import SmoothError, smooth_checkpoint, smooth_scales

ROOT = Path(__file__).resolve().parent.parent
OUTLIERS = {"input_layernorm": (5, 77), "post_attention_layernorm": (9, 200)}


def _with_outlier_channels(model: Path) -> Path:
    """A few input channels 30x larger than the rest, as real LLMs have (what smoothing is for)."""
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    t = load_file(str(f))
    for name in t:
        for norm, channels in OUTLIERS.items():
            if name.endswith(norm + ".weight"):
                t[name] = t[name].clone()
                t[name][list(channels)] *= 30
    save_file(t, str(f), metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory, calibration_text):
    """(original, imatrix, smoothed, its imatrix) for a tiny llama with outlier channels."""
    from measure.imatrix_compute import compute_imatrix

    d = tmp_path_factory.mktemp("smooth")
    model = _with_outlier_channels(make_tiny_model("llama", d / "orig"))
    im = compute_imatrix(model, calibration_text, d / "imatrix.gguf", ctx=64, chunks=8, device="cpu")
    smooth_checkpoint(model, im, d / "smoothed", d / "smoothed-imatrix.gguf", alpha=0.5)
    return model, im, d / "smoothed", d / "smoothed-imatrix.gguf"


def _logits(model: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.inference_mode():
        return m(input_ids=ids).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_smoothed_checkpoint_computes_the_same_function(arch, tmp_path, calibration_text):
    import torch

    from measure.imatrix_compute import compute_imatrix

    tied = arch == "qwen2"
    model = _with_outlier_channels(make_tiny_model(arch, tmp_path / "m", tie_word_embeddings=tied))
    im = compute_imatrix(model, calibration_text, tmp_path / "i.gguf", ctx=64, chunks=2, device="cpu",
                         process_output=arch == "llama")
    r = smooth_checkpoint(model, im, tmp_path / "s", tmp_path / "si.gguf")
    # an untied head is smoothed through the final norm when the imatrix covers it (--process-output)
    assert r.sites == 3 * 2 + (arch == "llama")
    assert r.skipped == ([] if arch != "qwen3" else ["model.norm.weight"])
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = _logits(model, ids), _logits(tmp_path / "s", ids)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
    # and it did change the weights (a no-op would pass the check above)
    import torch
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert w["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert w["model.embed_tokens.weight"].dtype == torch.bfloat16  # untouched tensors keep their dtype
    before = load_file(str(model / "model.safetensors"))["model.layers.0.input_layernorm.weight"].float().numpy()
    after = w["model.layers.0.input_layernorm.weight"].numpy()
    out = list(OUTLIERS["input_layernorm"])
    # the 30x outlier channels of the norm (the attention input) come out far less outlying
    ratio = [np.abs(n[out]).min() / np.median(np.abs(n)) for n in (before, after)]
    assert ratio[1] < ratio[0] / 3, ratio
    info = json.loads((tmp_path / "s" / "smoothing.json").read_text())
    assert info["alpha"] == 0.5 and info["sites"] == r.sites


def _shard(model: Path, out: Path) -> Path:
    """The same checkpoint as two safetensors files and an index (as every large hub checkpoint ships)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    (out / "model.safetensors").unlink()
    t = load_file(str(model / "model.safetensors"))
    names = sorted(t)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ns in parts.items():
        save_file({n: t[n] for n in ns}, str(out / f), metadata={"format": "pt"})
    weight_map = {n: f for f, ns in parts.items() for n in ns}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_sharded_checkpoint_smooths_file_by_file_to_the_same_tensors(smoothed, tmp_path):
    """Each input file is rewritten tensor by tensor (so a 70B checkpoint never sits in memory): a sharded copy
    gives the same tensors, bit for bit, under the same file names and index, and transformers loads it."""
    import torch
    from safetensors.torch import load_file

    model, im, whole, _ = smoothed
    sharded = _shard(model, tmp_path / "sharded")
    smooth_checkpoint(sharded, im, tmp_path / "s", tmp_path / "si.gguf", alpha=0.5)
    files = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"]
    ref = load_file(str(whole / "model.safetensors"))
    got = {}
    for f in files:
        part = load_file(str(tmp_path / "s" / f))
        assert all(weight_map[n] == f for n in part)
        got.update(part)
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(_logits(tmp_path / "s", ids), _logits(whole, ids))


def test_rescaled_imatrix_is_the_smoothed_models_own(smoothed, calibration_text, tmp_path):
    from measure.imatrix import load_imatrix
    from measure.imatrix_compute import compute_imatrix

    _, _, model, im = smoothed
    own = load_imatrix(compute_imatrix(model, calibration_text, tmp_path / "own.gguf", ctx=64, chunks=8,
                                       device="cpu"))
    ours = load_imatrix(im)
    assert set(own.names()) == set(ours.names())
    for n in own.names():
        np.testing.assert_allclose(ours.importance(n), own.importance(n), rtol=2e-3, atol=1e-7, err_msg=n)


def test_smoothing_shrinks_the_spread_of_matmul_inputs(smoothed):
    from measure.imatrix import load_imatrix

    _, im, _, sim = smoothed
    before, after = load_imatrix(im), load_imatrix(sim)
    for n in ("blk.0.attn_q.weight", "blk.1.ffn_gate.weight", "blk.0.ffn_down.weight"):
        spread = [np.ptp(np.log(m.importance(n))) for m in (before, after)]
        assert spread[1] < 0.75 * spread[0], (n, spread)


def test_smooth_scales_balance_and_normalise():
    s = smooth_scales(np.array([1.0, 100.0, 0.0, 4.0]), np.array([1.0, 1.0, 1.0, 0.25]), alpha=0.5)
    assert s[2] == 1.0                       # a channel never activated is left alone
    live = s[[0, 1, 3]]
    assert np.exp(np.log(live).mean()) == pytest.approx(1.0)
    assert s[1] / s[0] == pytest.approx(10.0)  # sqrt of the activation ratio
    assert s[3] / s[0] == pytest.approx(4.0)   # sqrt(4) / sqrt(0.25)


def test_llama_cpp_runs_the_smoothed_file_with_less_loss(smoothed, tmp_path, reference, evaluation_text):
    """Uniform Q8_0 of both checkpoints, KLD against the original's F32 in llama-perplexity: the smoothed file's
    activation rounding (and weight rounding) costs less."""
    from llamacpp.upstream import find_sources
    from verify.llamacpp_engine import LlamaCppEngine

    model, im, smodel, sim = smoothed
    src = find_sources()
    env = {"PYTHONPATH": f"{src / 'gguf-py'}:{src}"}
    base = tmp_path / "base.gguf"
    subprocess.run([sys.executable, src / "convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", base],
                   check=True, capture_output=True, env={**os.environ, **env})
    files = {}
    for label, m, i in (("original", model, im), ("smoothed", smodel, sim)):
        files[label] = tmp_path / f"{label}.gguf"
        p = subprocess.run([sys.executable, ROOT / "convert_hf_to_gguf_strategy.py", m, "--outtype", "q8_0",
                            "--imatrix", i, "--outfile", files[label]], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-2000:]
    eng = LlamaCppEngine(reference.tool("llama-perplexity"), threads=2)
    raw = tmp_path / "base.kld"
    eng.run_base(base, evaluation_text, 128, 4, raw)
    kld = {k: eng.compare(f, raw, 128, text=evaluation_text).kld_mean for k, f in files.items()}
    assert kld["smoothed"] < 0.8 * kld["original"], kld


def test_unsupported_architecture_and_foreign_output_dir_are_one_line_errors(tmp_path, calibration_text):
    from measure.imatrix_compute import compute_imatrix

    moe = make_tiny_model("mixtral", tmp_path / "moe")
    im = compute_imatrix(moe, calibration_text, tmp_path / "i.gguf", ctx=64, chunks=1, device="cpu")
    p = subprocess.run([sys.executable, "-m", "measure", "smooth", moe, "--imatrix", im, "-o", tmp_path / "s",
                        "--imatrix-out", tmp_path / "si.gguf"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "MixtralForCausalLM is not supported" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
    p = subprocess.run([sys.executable, "-m", "measure", "smooth", moe, "--imatrix", im, "-o", tmp_path / "s",
                        "--imatrix-out", tmp_path / "si.gguf", "--order-text", calibration_text, "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "MixtralForCausalLM is not supported" in p.stderr, p.stderr[-500:]
    assert len(p.stderr.strip().splitlines()) == 1

    llama = make_tiny_model("llama", tmp_path / "llama")
    im = compute_imatrix(llama, calibration_text, tmp_path / "l.gguf", ctx=64, chunks=1, device="cpu")
    foreign = tmp_path / "taken"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SmoothError, match="not a smoothed checkpoint"):
        smooth_checkpoint(llama, im, foreign, tmp_path / "x.gguf")
    assert (foreign / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".taken")] == []
    with pytest.raises(SmoothError, match="between 0 and 1"):
        smooth_checkpoint(llama, im, tmp_path / "y", tmp_path / "y.gguf", alpha=1.5)


def test_truncated_checkpoint_and_bad_config_are_one_line_errors(tmp_path, calibration_text):
    import shutil

    from measure.imatrix_compute import compute_imatrix

    llama = make_tiny_model("llama", tmp_path / "llama")
    im = compute_imatrix(llama, calibration_text, tmp_path / "l.gguf", ctx=64, chunks=1, device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])

    def run(model: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "measure", "smooth", model, "--imatrix", im, "-o",
                               tmp_path / "s", "--imatrix-out", tmp_path / "si.gguf"],
                              capture_output=True, text=True, cwd=ROOT)

    p = run(broken)
    assert p.returncode == 2 and "truncated safetensors" in p.stderr and str(st) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    st.write_bytes((llama / "model.safetensors").read_bytes())
    (broken / "config.json").write_text("{not json")
    p = run(broken)
    assert p.returncode == 2 and "config.json: not a readable model config" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_original_imatrix_with_smoothed_checkpoint_is_a_one_line_error(smoothed, tmp_path):
    """The original's imatrix weights the wrong channels of a smoothed checkpoint (off by s^2 each): measuring or
    converting with it is refused, naming the file to pass; the rescaled one is accepted."""
    _, im, model, sim = smoothed

    def measure(imatrix: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "measure", model, "--imatrix", imatrix, "--types", "q8_0",
                               "--db", tmp_path / f"{imatrix.stem}.db", "--workers", "1", "--no-progress"],
                              capture_output=True, text=True, cwd=ROOT)

    p = measure(im)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "imatrix of the checkpoint before smoothing" in p.stderr and str(im) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert measure(sim).returncode == 0

    out = tmp_path / "o.gguf"
    p = subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf_strategy.py"), model, "--imatrix", im,
                        "--outtype", "q8_0", "--outfile", out], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "before smoothing" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_reordered_hidden_channels_compute_the_same_function(arch, tmp_path, calibration_text):
    """Smoothing plus a permutation of the hidden channels (embedding and head columns, norms, o/down rows) keeps
    the logits, also with a tied head; the imatrix is permuted with the model; tensors smoothing leaves alone
    keep their dtype when only permuted."""
    import torch
    from safetensors.torch import load_file

    from measure.imatrix import load_imatrix
    from measure.imatrix_compute import compute_imatrix

    tied = arch == "qwen2"
    model = _with_outlier_channels(make_tiny_model(arch, tmp_path / "m", tie_word_embeddings=tied))
    im = compute_imatrix(model, calibration_text, tmp_path / "i.gguf", ctx=64, chunks=2, device="cpu",
                         process_output=arch == "llama")
    order = np.random.default_rng(3).permutation(256)
    smooth_checkpoint(model, im, tmp_path / "s", tmp_path / "si.gguf", order=order)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = _logits(model, ids), _logits(tmp_path / "s", ids)
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(tmp_path / "s" / "model.safetensors"))
    emb = "model.embed_tokens.weight"
    assert after[emb].dtype == torch.bfloat16 and torch.equal(after[emb], before[emb][:, order])
    assert json.loads((tmp_path / "s" / "smoothing.json").read_text())["channel_order"] == order.tolist()
    # the permuted, rescaled imatrix is still the new checkpoint's own
    own = load_imatrix(compute_imatrix(tmp_path / "s", calibration_text, tmp_path / "own.gguf", ctx=64, chunks=2,
                                       device="cpu", process_output=arch == "llama"))
    ours = load_imatrix(tmp_path / "si.gguf")
    for n in own.names():
        np.testing.assert_allclose(ours.importance(n), own.importance(n), rtol=2e-3, atol=1e-7, err_msg=n)
    with pytest.raises(SmoothError, match="not a permutation"):
        smooth_checkpoint(model, im, tmp_path / "s2", tmp_path / "s2.gguf", order=np.zeros(256, dtype=int))


def test_channel_order_puts_large_head_inputs_together_and_lowers_the_modelled_cost():
    """Synthetic statistics: four channels 20x the rest, one per block. The chosen order gathers them into one
    block (the other blocks' scales shrink), the modelled cost falls, and the same seed gives the same order."""
    from measure.permute import HeadStats, choose_order, order_cost

    rng = np.random.default_rng(0)
    k, t, v = 128, 512, 300
    x = rng.standard_normal((t, k))
    big = [5, 40, 70, 100]
    x[:, big] *= 20
    stats = HeadStats(inputs_sq=x * x, sensitivity=np.full(k, 0.01), row_weight=np.full(v, 1.0 / v),
                      head=rng.standard_normal((v, k)).astype(np.float32) * 0.02)
    order = choose_order(stats, swaps_per_channel=100)
    assert sorted(order.tolist()) == list(range(k))
    blocks = {int(np.where(order == c)[0][0]) // 32 for c in big}
    assert len(blocks) == 1, blocks
    assert order_cost(stats, order) < 0.8 * order_cost(stats, np.arange(k))  # the weight term barely moves
    np.testing.assert_array_equal(order, choose_order(stats, swaps_per_channel=100))


def test_cli_orders_channels_from_a_calibration_text(smoothed, tmp_path, calibration_text):
    model, im, _, _ = smoothed
    p = subprocess.run([sys.executable, "-m", "measure", "smooth", model, "--imatrix", im, "-o", tmp_path / "s",
                        "--imatrix-out", tmp_path / "si.gguf", "--order-text", calibration_text, "--order-chunks",
                        "2", "--order-ctx", "64", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "channel order: modelled head loss" in p.stdout and "hidden channels reordered" in p.stdout
    order = json.loads((tmp_path / "s" / "smoothing.json").read_text())["channel_order"]
    assert sorted(order) == list(range(256))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    p = subprocess.run([sys.executable, "-m", "measure", "smooth", model, "--imatrix", im, "-o", tmp_path / "t",
                        "--imatrix-out", tmp_path / "ti.gguf", "--order-text", short, "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "fewer than one chunk" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()
    p = subprocess.run([sys.executable, "-m", "measure", "smooth", model, "--imatrix", im, "-o", tmp_path / "u",
                        "--imatrix-out", tmp_path / "ui.gguf", "--order-text", calibration_text, "--order-chunks", "0",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "--order-chunks 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "u").exists()
