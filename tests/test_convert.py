"""convert_hf_to_gguf_strategy.py: one pass, byte-identical to upstream F32 conversion + reference llama-quantize.

The parity recipe (the two-step path users run today, with the very same plan):
  upstream convert_hf_to_gguf.py --outtype f32  ->  ref-f32.gguf
  our --export-tensor-type-file                 ->  types.txt
  llama-quantize --tensor-type-file types.txt [--imatrix I] ref-f32.gguf ref.gguf Q8_0
and our one-pass `--strategy plan.yaml [--imatrix I]` must give, tensor by tensor, the same type and bytes.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "convert_hf_to_gguf_strategy.py"

import convert_hf_to_gguf_strategy as cs  # noqa: E402

# every type the converter may be asked for; the ones whose quantizer module is not there yet are reported
WANTED_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q5_0", "Q4_1", "Q5_1",
                "Q8_0", "F16", "BF16"]


def available_types() -> list[str]:
    import quants

    out = []
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for t in WANTED_TYPES:
        try:
            quants.quantize(x, t, np.ones(256, np.float32))
        except (ImportError, AttributeError):
            continue
        out.append(t)
    return out


def mixed_plan(infos, types: list[str]) -> dict:
    """Explicit entries cycling through `types` over the quantizable tensors, plus a rule and a default."""
    names = [i.name for i in infos if i.quantizable]
    tensors = {n: types[k % len(types)] for k, n in enumerate(names[1:])}
    return {"format": "gguf-strategy/1", "default_type": "Q8_0",
            "rules": [{"pattern": "attn_v", "type": types[-1]}], "tensors": tensors}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"converter failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def upstream_f32(model: Path, out: Path) -> Path:
    from llamacpp.upstream import find_sources

    subprocess.run([sys.executable, str(find_sources() / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
                    "--outfile", str(out)], check=True, capture_output=True)
    return out


def reference_quantize(reference, f32: Path, types_file: Path, out: Path, imatrix: Path | None = None) -> Path:
    cmd = [str(reference.tool("llama-quantize")), "--tensor-type-file", str(types_file)]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(f32), str(out), "Q8_0"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def read_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from catalog.hook import activate

    activate()
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


def read_kv(path: Path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    for name, f in r.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            out[name] = f.parts[f.data[0]][0].item()
    return out


def compare(ours: Path, ref: Path) -> list[str]:
    """Differences, tensor by tensor, each with why (type or bytes, and how many blocks differ)."""
    a, b = read_tensors(ours), read_tensors(ref)
    diffs = []
    if a.keys() != b.keys():
        diffs.append(f"tensor sets differ: only ours {sorted(a.keys() - b.keys())}, only ref {sorted(b.keys() - a.keys())}")
    for name in sorted(a.keys() & b.keys()):
        (ta, da), (tb, db) = a[name], b[name]
        if ta != tb:
            diffs.append(f"{name}: type {ta} vs reference {tb}")
        elif da != db:
            n_bad = int(np.count_nonzero(np.frombuffer(da, np.uint8) != np.frombuffer(db, np.uint8)))
            diffs.append(f"{name} ({ta}): {n_bad} of {len(da)} bytes differ")
    return diffs


def two_step_parity(tiny_or_dir: Path, tmp: Path, reference, plan: dict, imatrix: Path | None = None,
                    extra: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    plan_file = tmp / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    im = ("--imatrix", str(imatrix)) if imatrix else ()
    run_cli(tiny_or_dir, "--strategy", plan_file, "--export-tensor-type-file", tmp / "types.txt", *extra)
    ref = reference_quantize(reference, upstream_f32(tiny_or_dir, tmp / "ref-f32.gguf"), tmp / "types.txt",
                             tmp / "ref.gguf", imatrix)
    ours = tmp / "ours.gguf"
    run_cli(tiny_or_dir, "--strategy", plan_file, *im, "--outfile", ours, *extra)
    return ours, compare(ours, ref)


def perplexity_runs(reference, model: Path, evaluation_text: Path) -> None:
    """llama.cpp loads the file and evaluates it: llama-perplexity exits 0 and its --kl-divergence-base output
    (the log-probs of every chunk, written synchronously) is complete; printed values must be finite."""
    base = model.with_suffix(".logprobs")
    p = subprocess.run([str(reference.tool("llama-perplexity")), "-m", str(model), "-f", str(evaluation_text),
                        "-c", "128", "--chunks", "3", "-t", "2", "--kl-divergence-base", str(base)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # 3 chunks x 63 scored tokens x n_vocab (>= 512 here) x 2 bytes
    assert base.is_file() and base.stat().st_size >= 3 * 63 * 512 * 2, "log-probs missing: evaluation did not finish"
    # llama.cpp logs from a worker thread and may drop the last lines when piped: values only when present
    ppl = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+|nan|inf)", p.stdout + p.stderr)]
    assert all(np.isfinite(ppl)), (p.stdout + p.stderr)[-2000:]
    base.unlink()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "gemma"])
def test_mixed_strategy_matches_llama_quantize(tiny_model, tmp_path, reference, evaluation_text, arch):
    import catalog

    model = tiny_model(arch)
    types = available_types()
    assert {"Q8_0", "F16", "Q4_K"} <= set(types)
    plan = mixed_plan(catalog.list_tensors(model), types)
    ours, diffs = two_step_parity(model, tmp_path, reference, plan)
    assert diffs == [], "\n".join(diffs)
    perplexity_runs(reference, ours, evaluation_text)


@pytest.mark.reference
@pytest.mark.slow
def test_fallbacks_match_llama_quantize(tiny_model, tmp_path, reference, evaluation_text):
    """Rows of 320: K-quants and IQ4_XS fall back exactly as llama-quantize's tensor_type_fallback."""
    import catalog

    model = tiny_model("llama", hidden_size=320)
    types = [t for t in available_types() if t in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS")]
    infos = catalog.list_tensors(model)
    plan = {"format": "gguf-strategy/1", "default_type": types[0],
            "tensors": {i.name: types[k % len(types)] for k, i in enumerate(infos) if i.quantizable}}
    ours, diffs = two_step_parity(model, tmp_path, reference, plan)
    assert diffs == [], "\n".join(diffs)
    written = read_tensors(ours)
    assert written["blk.0.attn_q.weight"][0] != plan["tensors"]["blk.0.attn_q.weight"]  # it did fall back
    perplexity_runs(reference, ours, evaluation_text)


@pytest.fixture(scope="session")
def make_imatrix(tiny_model, tmp_path_factory, reference, calibration_text):
    """make_imatrix(arch) -> (model dir, imatrix.gguf) from the reference llama-imatrix (cached per arch)."""
    cache: dict[str, tuple[Path, Path]] = {}

    def make(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            tmp = tmp_path_factory.mktemp(f"imatrix-{arch}")
            model = tiny_model(arch)
            f32 = upstream_f32(model, tmp / "f32.gguf")
            out = tmp / "imatrix.gguf"
            p = subprocess.run([str(reference.tool("llama-imatrix")), "-m", str(f32), "-f", str(calibration_text),
                                "-c", "128", "--chunks", "4", "-o", str(out), "-t", "2"], capture_output=True, text=True)
            assert p.returncode == 0, p.stderr[-2000:]
            cache[arch] = (model, out)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_imatrix(make_imatrix):
    return make_imatrix("llama")


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt", [("llama", "gguf"), ("mixtral", "gguf"), ("llama", "dat")])
def test_imatrix_strategy_matches_llama_quantize(make_imatrix, tmp_path, reference, evaluation_text, arch, fmt):
    """Same plan, same imatrix (GGUF or legacy .dat; MoE: one importance row per expert) -> same bytes and the
    same quantize.imatrix.* keys as llama-quantize."""
    pytest.importorskip("measure.imatrix")
    import catalog
    from measure.imatrix import load_imatrix, save_imatrix_dat

    model, imatrix = make_imatrix(arch)
    if fmt == "dat":
        imatrix = save_imatrix_dat(tmp_path / "imatrix.dat", load_imatrix([imatrix]))
    types = available_types()
    plan = mixed_plan(catalog.list_tensors(model), types)
    ours, diffs = two_step_parity(model, tmp_path, reference, plan, imatrix=imatrix)
    assert diffs == [], "\n".join(diffs)
    kv, ref_kv = read_kv(ours), read_kv(tmp_path / "ref.gguf")
    keys = [k for k in ref_kv if k.startswith("quantize.imatrix.")]
    assert "quantize.imatrix.entries_count" in keys
    assert {k: kv.get(k) for k in keys} == {k: ref_kv[k] for k in keys}
    assert kv[cs.STRATEGY_DIGEST_KEY]
    perplexity_runs(reference, ours, evaluation_text)


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_matches_llama_quantize(smollm2, tmp_path, reference, evaluation_text):
    """The real checkpoint: rows of 576 and 1536, so every K-quant row of 576 falls back too."""
    import catalog

    types = available_types()
    plan = mixed_plan(catalog.list_tensors(smollm2), types)
    ours, diffs = two_step_parity(smollm2, tmp_path, reference, plan)
    assert diffs == [], "\n".join(diffs)
    perplexity_runs(reference, ours, evaluation_text)


# ------------------------------------------------------------------------------------------------ behaviour
def test_uniform_outtype_and_metadata(tiny_model, tmp_path):
    import gguf

    model = tiny_model("llama")
    out = tmp_path / "q.gguf"
    assert cs.main([str(model), "--outtype", "q4_k", "--outfile", str(out)]) == 0
    t = read_tensors(out)
    assert t["blk.0.attn_q.weight"][0] == "Q4_K" and t["blk.0.attn_norm.weight"][0] == "F32"
    kv = read_kv(out)
    assert kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert kv[cs.STRATEGY_DIGEST_KEY] == cs.TypePolicy(uniform="Q4_K").effective_plan().digest()


def test_upstream_f16_unchanged(tiny_model, tmp_path):
    """Without new options the output equals upstream's own --outtype f16 conversion, tensor for tensor."""
    from llamacpp.upstream import find_sources

    model = tiny_model("qwen2")
    ours = tmp_path / "ours.gguf"
    assert cs.main([str(model), "--outtype", "f16", "--outfile", str(ours)]) == 0
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(find_sources() / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
                    "--outfile", str(ref)], check=True, capture_output=True)
    assert compare(ours, ref) == []
    assert read_kv(ours)["general.file_type"] == read_kv(ref)["general.file_type"]


def test_strategy_digest_and_default_type(tiny_model, tmp_path):
    from strategy.plan import load_plan

    model = tiny_model("llama")
    plan = tmp_path / "p.yaml"
    plan.write_text("format: gguf-strategy/1\ndefault_type: Q8_0\ntensors: {blk.0.attn_k.weight: Q5_1}\n")
    out = tmp_path / "o.gguf"
    assert cs.main([str(model), "--strategy", str(plan), "--default-type", "q4_1", "--outfile", str(out)]) == 0
    t = read_tensors(out)
    assert t["blk.0.attn_k.weight"][0] == "Q5_1" and t["blk.1.attn_k.weight"][0] == "Q4_1"
    eff = cs.TypePolicy(plan=load_plan(plan), default_type="Q4_1").effective_plan()
    assert read_kv(out)[cs.STRATEGY_DIGEST_KEY] == eff.digest()


def test_default_output_name_uses_main_type(tiny_model, tmp_path):
    model_copy = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), model_copy)
    assert cs.main([str(model_copy), "--outtype", "Q5_K"]) == 0
    produced = [p.name for p in model_copy.glob("*.gguf")]
    assert len(produced) == 1 and "Q5_K_M" in produced[0], produced


def test_failure_mid_write_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    """Disk full (ENOSPC while writing): exit 1, one line, nothing at the destination, temp dir gone."""
    model = tiny_model("llama")
    out = tmp_path / "full.gguf"
    calls = {"n": 0}
    real = cs._quantize_now

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real(*a, **k)

    monkeypatch.setattr(cs, "_quantize_now", flaky)
    assert cs.main([str(model), "--outtype", "q8_0", "--outfile", str(out)]) == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llama")
    out = tmp_path / "int.gguf"
    calls = {"n": 0}
    real = cs._quantize_now

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cs, "_quantize_now", interrupted)
    assert cs.main([str(model), "--outtype", "q4_k", "--outfile", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_file(tiny_model, tmp_path):
    """A real kill (SIGTERM) of the running CLI while it writes."""
    import signal
    import time

    model = tiny_model("llama", num_hidden_layers=6, intermediate_size=2048)
    out = tmp_path / "killed.gguf"
    p = subprocess.Popen([sys.executable, str(SCRIPT), str(model), "--outtype", "q4_k", "--outfile", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    writing = False
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        partial = [f for d in tmp_path.glob(".killed.gguf.partial-*") for f in d.iterdir()]
        if partial and partial[0].stat().st_size > 0:
            writing = True
            break
        time.sleep(0.02)
    assert writing, "the converter finished before it could be killed; make the model bigger"
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert not out.exists()
    assert [x for x in tmp_path.iterdir()] == []


def test_export_tensor_type_file(tiny_model, tmp_path):
    from strategy.plan import load_plan

    model = tiny_model("mixtral")
    plan = tmp_path / "p.yaml"
    plan.write_text("format: gguf-strategy/1\ndefault_type: Q6_K\nrules: [{pattern: exps, type: Q4_K}]\n")
    out = tmp_path / "types.txt"
    assert cs.main([str(model), "--strategy", str(plan), "--export-tensor-type-file", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert r"^blk\.0\.ffn_down_exps\.weight$=q4_k" in lines
    assert r"^blk\.0\.attn_q\.weight$=q6_k" in lines
    assert not any("norm" in ln or "ffn_gate_inp" in ln for ln in lines)  # never quantized: not exported
    assert len(lines) == 2 + 2 * 7  # token_embd, output + 7 quantizable per layer (q, k, v, o, 3 x exps)
    assert load_plan(plan).type_for("blk.1.ffn_up_exps.weight") == "Q4_K"


# ------------------------------------------------------------------------------------------------ bad input
def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("error: "), p.stderr
    return last


def test_error_not_a_model_dir(tmp_path):
    line = one_line_error(run_cli(tmp_path, "--outtype", "q4_k", check=False))
    assert "not a model directory" in line and str(tmp_path) in line


def test_error_unsupported_architecture(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    cfg = (d / "config.json").read_text().replace("LlamaForCausalLM", "FrobnicatorForCausalLM")
    (d / "config.json").write_text(cfg)
    line = one_line_error(run_cli(d, check=False))
    assert "FrobnicatorForCausalLM" in line and "not supported" in line


def test_error_truncated_safetensors(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    line = one_line_error(run_cli(d, "--outtype", "q8_0", check=False))
    assert "truncated" in line and "model.safetensors" in line


def test_error_corrupt_safetensors_header(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), d)
    st = d / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:16] = b"\x00garbage"
    st.write_bytes(bytes(data))
    line = one_line_error(run_cli(d, check=False))
    assert "corrupt" in line and "model.safetensors" in line


def test_error_strategy_names_missing_tensor(tiny_model, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("format: gguf-strategy/1\ntensors: {blk.9.attn_q.weight: Q4_K, blk.0.attn_qq.weight: Q4_K}\n")
    line = one_line_error(run_cli(tiny_model("llama"), "--strategy", plan, "--outfile", tmp_path / "o.gguf",
                                  check=False))
    assert "blk.9.attn_q.weight" in line and "did you mean" in line and str(plan) in line
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("opt", [("--outtype", "q9_k"), ("--default-type", "iq1_zz")])
def test_error_unknown_type_option(tiny_model, opt):
    line = one_line_error(run_cli(tiny_model("llama"), *opt, check=False))
    assert opt[1] in line and "valid types" in line


def test_error_unknown_type_in_strategy(tiny_model, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("format: gguf-strategy/1\ndefault_type: Q4_K\ntensors: {blk.0.attn_q.weight: Q7_K}\n")
    line = one_line_error(run_cli(tiny_model("llama"), "--strategy", plan, check=False))
    assert "Q7_K" in line


def test_error_imatrix_for_another_model(tiny_imatrix, tiny_model, tmp_path):
    pytest.importorskip("measure.imatrix")
    _, imatrix = tiny_imatrix
    other = tiny_model("llama", num_hidden_layers=1, hidden_size=128, intermediate_size=256)
    # 1 layer, 128 wide: blk.1.* missing and blk.0.* of the wrong size
    line = one_line_error(run_cli(other, "--outtype", "q4_k", "--imatrix", imatrix, "--outfile",
                                  tmp_path / "o.gguf", check=False))
    assert "another model" in line
    assert not (tmp_path / "o.gguf").exists()


def test_error_imatrix_truncated(tiny_imatrix, tmp_path):
    pytest.importorskip("measure.imatrix")
    model, imatrix = tiny_imatrix
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(imatrix.read_bytes()[: imatrix.stat().st_size // 2])
    line = one_line_error(run_cli(model, "--outtype", "q4_k", "--imatrix", bad, check=False))
    assert "cut.gguf" in line


def test_split_and_vocab_only_keep_working(tiny_model, tmp_path):
    """Upstream options pass through: --split-max-tensors shards (atomically renamed), --vocab-only."""
    import gguf

    model = tiny_model("llama")
    assert cs.main([str(model), "--outtype", "q6_k", "--split-max-tensors", "8",
                    "--outfile", str(tmp_path / "m.gguf")]) == 0
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    types = {t.tensor_type.name for s in shards for t in gguf.GGUFReader(tmp_path / s).tensors}
    assert types == {"Q6_K", "F32"}
    assert cs.main([str(model), "--vocab-only", "--outfile", str(tmp_path / "v.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    assert len(r.tensors) == 0 and "tokenizer.ggml.tokens" in r.fields


def test_strategy_entry_for_never_quantized_tensor_keeps_f32(tiny_model, tmp_path, caplog):
    model = tiny_model("mixtral")
    plan = tmp_path / "p.yaml"
    plan.write_text("format: gguf-strategy/1\ndefault_type: Q4_K\n"
                    "tensors: {blk.0.ffn_gate_inp.weight: Q4_K, blk.0.attn_norm.weight: Q8_0}\n")
    out = tmp_path / "o.gguf"
    assert cs.main([str(model), "--strategy", str(plan), "--outfile", str(out)]) == 0
    t = read_tensors(out)
    assert t["blk.0.ffn_gate_inp.weight"][0] == "F32" and t["blk.0.attn_norm.weight"][0] == "F32"
    assert t["blk.0.ffn_down_exps.weight"][0] == "Q4_K"
    assert "never quantized" in caplog.text


def test_cli_without_model_is_a_usage_error():
    p = run_cli(check=False)
    assert p.returncode == 2 and "required: model" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="a one-core machine's BLAS pool has one thread")
def test_prefetcher_runs_one_blas_thread_per_call_while_open() -> None:
    """The quantize threads fill the cores; a BLAS pool per call beside them only competes (same bytes, more CPU
    time). Closing restores the caller's setting: main() may run in a process that goes on."""
    from threadpoolctl import threadpool_info

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    assert max(before) > 1
    p = cs.Prefetcher(2)
    try:
        assert blas() == [1] * len(before)
    finally:
        p.close()
    assert blas() == before
    single = cs.Prefetcher(1)  # inline quantization: BLAS keeps its pool
    assert blas() == before
    single.close()
