"""tune/: block scale fields split and written back exactly for every tunable type; the tuning loop lowers
held-out KL on a tiny model; llama.cpp loads the result and measures it better; codes never change; user errors
are one line with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import convert_upstream

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(7)


def _field_mask(qtype, n_blocks_per_row: int, rows: int) -> np.ndarray:
    """True on the bytes of the d/m fields of every block."""
    from gguf import GGML_QUANT_SIZES

    from tune.fields import SCALE_FIELDS

    _, bpb = GGML_QUANT_SIZES[qtype]
    mask = np.zeros((rows, n_blocks_per_row, bpb), dtype=bool)
    for off in SCALE_FIELDS[qtype.name]:
        if off is not None:
            mask[:, :, off:off + 2] = True
    return mask.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K",
                                  "Q4_K", "Q5_K", "Q6_K"])
def test_fields_split_and_write_back(name):
    import quants
    from tune.fields import split, with_fields

    qt = quants.parse_type(name)
    rows, k = 3, 512
    w = RNG.standard_normal((rows, k)).astype(np.float32)
    raw = quants.quantize(w, qt, RNG.random(k).astype(np.float32) + 0.1 if quants.requires_importance(qt) else None)
    f = split(raw, qt)
    ref = quants.dequantize(raw, qt).reshape(rows, k)
    np.testing.assert_allclose(f.weights(), ref, rtol=1e-6, atol=1e-7)
    assert (f.m is None) == (name in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q6_K"))
    # doubling every scale (and halving every minimum) is exact in fp16: the decoder must see exactly that
    d2, m2 = f.d * 2, None if f.m is None else f.m * 0.5
    raw2 = with_fields(raw, qt, d2, m2)
    np.testing.assert_allclose(quants.dequantize(raw2, qt).reshape(rows, k), f.weights(d2, m2), rtol=1e-6, atol=1e-7)
    mask = _field_mask(qt, k // quants.block_size(qt), rows)
    assert np.array_equal(raw2[~mask], raw[~mask]), "codes or sub-block scales changed"
    assert not np.array_equal(raw2[mask], raw[mask])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K",
                                  "Q4_K", "Q5_K", "Q6_K"])
def test_codes_split_and_write_back(name):
    """a = s * T[rank] exactly; the same ranks write the same bytes; moved ranks decode to the moved levels and
    change only the code bits."""
    import quants
    from tune.fields import levels_by_rank, split, with_fields

    qt = quants.parse_type(name)
    rows, k = 3, 512
    w = RNG.standard_normal((rows, k)).astype(np.float32)
    raw = quants.quantize(w, qt, RNG.random(k).astype(np.float32) + 0.1 if quants.requires_importance(qt) else None)
    f = split(raw, qt, codes=True)
    values = levels_by_rank(qt)
    unit = 1.0 if f.s is None else f.s
    np.testing.assert_array_equal(f.a, unit * values[f.rank])
    assert (f.s is None) == (name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"))
    assert np.array_equal(with_fields(raw, qt, f.d, f.m, rank=f.rank), raw)
    moved = f.rank.astype(np.int64) + RNG.choice([-1, 0, 1], size=f.rank.shape)
    moved = np.clip(moved, 0, len(values) - 1)
    assert (moved != f.rank).mean() > 0.5
    raw2 = with_fields(raw, qt, f.d, f.m, rank=moved)
    expect = (unit * values[moved]) * f.d[..., None]
    if f.c is not None:
        expect = expect + f.c * f.m[..., None]
    np.testing.assert_allclose(quants.dequantize(raw2, qt).reshape(rows, -1), expect.reshape(rows, -1),
                               rtol=1e-6, atol=1e-7)
    # only code bits moved: the fp16 fields (and every sub-block scale, checked by the decode above) are intact
    mask = _field_mask(qt, k // quants.block_size(qt), rows)
    assert np.array_equal(raw2[mask], raw[mask])


@pytest.mark.parametrize("name", ["Q5_1", "Q4_K", "IQ4_NL"])
def test_rank_offsets_place_float_weights_between_levels(name):
    """The code latents start where the float weight sits (nearest-rounded codes: inside +-0.5 of their own rank,
    on the side of the float weight); a code the float weight is not nearest to starts at its centre."""
    import torch

    import quants
    from tune.fields import levels_by_rank, split
    from tune.train import _rank_offsets

    qt = quants.parse_type(name)
    w = RNG.standard_normal((4, 256)).astype(np.float32)
    raw = quants.quantize(w, qt, None)
    f = split(raw, qt, codes=True)
    values = torch.from_numpy(levels_by_rank(qt))
    off = _rank_offsets(f, values, torch.from_numpy(w)).numpy()
    assert np.abs(off).max() <= 0.49 and np.abs(off).mean() > 0.1
    deq = f.weights().reshape(w.shape)
    unit = f.d[..., None] * (1.0 if f.s is None else f.s)  # negative for some IQ4 blocks: ranks run the other way
    err = (w - deq).reshape(off.shape) * np.sign(unit)
    inside = off != 0
    assert inside.mean() > 0.8
    assert (np.sign(off[inside]) == np.sign(err[inside])).mean() > 0.99  # the float weight's side of its level
    far = f.rank.astype(np.int64).copy()
    far[0, 0, 0] = min(far[0, 0, 0] + 3, len(values) - 1) if far[0, 0, 0] < 3 else far[0, 0, 0] - 3
    f.rank = far.astype(np.int16)
    assert _rank_offsets(f, values, torch.from_numpy(w)).numpy()[0, 0, 0] == 0


def test_codes_outside_the_allowed_levels_stay_fixed():
    """A Q8_0 block holding -128 (ggml never writes it; another tool might): that tensor's codes are not tuned,
    its scales still are, and with_fields without ranks leaves its codes as they were."""
    import quants
    from quants import levels
    from tune.fields import split, with_fields

    qt = quants.parse_type("Q8_0")
    raw = quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32), qt)
    assert split(raw, qt, codes=True).rank is not None
    codes = levels.unpack_codes(raw.reshape(-1, 34), qt)
    codes[0, 0] = 128  # the byte 0x80: level -128
    odd = levels.pack_codes(raw.reshape(-1, 34), codes, qt).reshape(raw.shape)
    f = split(odd, qt, codes=True)
    assert f.rank is None and f.s is None
    np.testing.assert_allclose(f.weights(), quants.dequantize(odd, qt).reshape(2, 64), rtol=1e-6)
    assert np.array_equal(with_fields(odd, qt, f.d), odd)


def test_fields_errors():
    import quants
    from tune import TuneError
    from tune.fields import split, with_fields

    with pytest.raises(TuneError, match="no tunable scale fields"):
        split(np.zeros((2, 64), np.uint8), quants.parse_type("BF16"))
    raw = quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32), quants.parse_type("Q8_0"))
    with pytest.raises(TuneError, match="left fp16's range"):
        with_fields(raw, quants.parse_type("Q8_0"), np.full((2, 2), 1e6, np.float32), name="blk.0.x")


@pytest.fixture(scope="module")
def tiny_pair(tiny_model, reference, tmp_path_factory):
    """(f32 base GGUF, llama-quantize --pure Q4_0 of it)."""
    d = tmp_path_factory.mktemp("tune")
    base = convert_upstream(tiny_model("llama"), d / "base.gguf")
    q = d / "q4_0.gguf"
    res = subprocess.run([str(reference.tool("llama-quantize")), "--pure", str(base), str(q), "Q4_0"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return base, q


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune", *args], capture_output=True, text=True, cwd=ROOT)


def _kld_before_after(reference, base, q, out, evaluation_text, tmp_path) -> tuple[float, float]:
    """llama.cpp's mean KLD of the input and the tuned file against the base, on text the tuning never read."""
    from verify.llamacpp_engine import LlamaCppEngine

    eng = LlamaCppEngine(reference.tool("llama-perplexity"), threads=2)
    eng.run_base(base, evaluation_text, 128, 16, tmp_path / "base.kld")
    return tuple(eng.compare(f, tmp_path / "base.kld", 128, text=evaluation_text).kld_mean for f in (q, out))


def _tensor_pairs(q, out):
    """(name, type, input bytes, tuned bytes) per tensor; the same tensors, types, shapes and file size."""
    import gguf

    ra, rb = gguf.GGUFReader(q), gguf.GGUFReader(out)
    assert out.stat().st_size == q.stat().st_size
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert (ta.name, ta.tensor_type, tuple(ta.shape)) == (tb.name, tb.tensor_type, tuple(tb.shape))
        yield ta.name, ta.tensor_type, np.asarray(ta.data), np.asarray(tb.data)


@pytest.mark.reference
@pytest.mark.slow
def test_tune_lowers_kl_and_llama_cpp_agrees(tiny_pair, reference, calibration_text, evaluation_text, tmp_path):
    base, q = tiny_pair
    out = tmp_path / "tuned.gguf"
    r = _cli(str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--ctx", "128",
             "--chunks", "24", "--val-chunks", "4", "--steps", "40", "--lr", "1e-3", "--eval-every", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out KL" in r.stdout and out.is_file()
    before, after = (float(x) for x in r.stdout.rsplit("held-out KL ", 1)[1].split(" (")[0].split(" -> "))
    assert after < 0.9 * before, r.stdout
    # llama.cpp loads it, and measures it closer to the base on text the tuning never read
    k_in, k_out = _kld_before_after(reference, base, q, out, evaluation_text, tmp_path)
    assert k_out < 0.95 * k_in, (k_in, k_out)
    # same tensors, types and sizes; only the fp16 fields and the norm vectors moved
    moved_norms = 0
    for name, qtype, a, b in _tensor_pairs(q, out):
        if qtype.name == "Q4_0":
            mask = _field_mask(qtype, a.shape[1] // 18, a.shape[0])
            assert np.array_equal(a[~mask], b[~mask]), name
        elif name.endswith("norm.weight"):
            moved_norms += not np.array_equal(a, b)
    assert moved_norms > 0


@pytest.mark.reference
@pytest.mark.slow
def test_tune_codes_lowers_kl_and_llama_cpp_agrees(tiny_pair, reference, calibration_text, evaluation_text,
                                                     tmp_path):
    """Codes tuned straight through their rounding: codes change, the file keeps its types and size, held-out
    KL falls, and llama.cpp measures the file closer to the base on text the tuning never read."""
    base, q = tiny_pair
    out = tmp_path / "tuned.gguf"
    r = _cli(str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--ctx", "128",
             "--chunks", "24", "--val-chunks", "4", "--steps", "40", "--what", "codes", "--code-lr", "0.003",
             "--eval-every", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = (float(x) for x in r.stdout.rsplit("held-out KL ", 1)[1].split(" (")[0].split(" -> "))
    n_changed = int(r.stdout.rsplit(" codes changed", 1)[0].rsplit(", ", 1)[1].replace(",", ""))
    assert after < 0.95 * before and n_changed > 0, r.stdout
    k_in, k_out = _kld_before_after(reference, base, q, out, evaluation_text, tmp_path)
    assert k_out < k_in, (k_in, k_out)
    diff = 0
    for name, qtype, a, b in _tensor_pairs(q, out):
        if qtype.name == "Q4_0":
            mask = _field_mask(qtype, a.shape[1] // 18, a.shape[0])
            assert np.array_equal(a[mask], b[mask]), name  # scales not tuned: only codes moved
            diff += int((a != b).sum())
        else:
            assert np.array_equal(a, b), name  # norms not tuned
    assert diff > 0


@pytest.mark.reference
def test_tuned_held_out_kl_is_what_the_written_file_measures(tiny_pair, calibration_text, tmp_path):
    """The best state is chosen on the fp16 values the file stores, not on float32 values it cannot hold: the
    written file, read back, measures the held-out KL the tuning reported."""
    from tune.train import tune_gguf

    base, q = tiny_pair
    kw = dict(ctx=64, chunks=12, val_chunks=3, lr=3e-4, eval_every=5, log=lambda _s: None)
    res = tune_gguf(q, base, [calibration_text], tmp_path / "tuned.gguf", steps=10, **kw)
    assert res.best_step > 0 and res.val_best < res.val_before, res
    again = tune_gguf(res.out, base, [calibration_text], tmp_path / "again.gguf", steps=0, **kw)
    assert again.val_before == pytest.approx(res.val_best, rel=1e-6, abs=0), (again.val_before, res.val_best)


@pytest.mark.reference
def test_chunk_counts_per_text(tiny_pair, calibration_text, evaluation_text, tmp_path):
    """One count per text: the model's samples can outnumber the imatrix text's chunks."""
    from tune.train import tune_gguf

    base, q = tiny_pair
    res = tune_gguf(q, base, [calibration_text, evaluation_text], tmp_path / "t.gguf", steps=0, ctx=64,
                    chunks=[5, 3], val_chunks=2, log=lambda _s: None)
    assert (res.train_chunks, res.val_chunks) == (6, 2)


@pytest.mark.reference
def test_tune_zero_steps_writes_the_input_unchanged(tiny_pair, calibration_text, tmp_path):
    base, q = tiny_pair
    out = tmp_path / "same.gguf"
    r = _cli(str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--ctx", "64",
             "--chunks", "6", "--val-chunks", "2", "--steps", "0")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == q.read_bytes()


@pytest.mark.reference
def test_tune_user_errors_are_one_line(tiny_pair, tiny_model, calibration_text, tmp_path):
    base, q = tiny_pair
    other = convert_upstream(tiny_model("llama", hidden_size=320), tmp_path / "other.gguf")
    out = tmp_path / "t.gguf"
    cases = [
        ((str(q), "--base", str(other), "--text", str(calibration_text), "-o", str(out)), "differs from"),
        ((str(q), "--base", str(base), "--text", str(tmp_path / "none.txt"), "-o", str(out)), "no such file"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(q)), "overwrite the input"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--what", "bias"),
         "choose from"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--what", "codes",
          "--code-lr", "0"), "--code-lr > 0"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--chunks", "2",
          "--val-chunks", "8", "--ctx", "64"), "need more than --val-chunks"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--chunks", "6,6"),
         "one per --text (1 given)"),
        ((str(q), "--base", str(base), "--text", str(calibration_text), "-o", str(out), "--chunks", "many"),
         "one count per --text"),
    ]
    for args, msg in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr
        assert not out.exists()
        assert not list(tmp_path.glob(".t.gguf.*"))


@pytest.mark.reference
def test_tune_job_runs_and_reports_progress(tiny_pair, calibration_text, tmp_path):
    """The jobs kind builds a command that runs as is, writes the file it names, and prints parseable progress."""
    from jobs.kinds import KINDS, parse_progress

    base, q = tiny_pair
    cmd = KINDS["tune"].build({"gguf": str(q), "base": str(base), "texts": [str(calibration_text)], "steps": 4,
                               "lr": 1e-3, "ctx": 64, "chunks": 6, "val_chunks": 2, "what": "scales,codes",
                               "code_lr": 0.003}, tmp_path)
    assert cmd.outputs == {"gguf": f"gguf/{q.stem}-tuned.gguf"}
    assert cmd.argv[cmd.argv.index("--code-lr") + 1] == "0.003"
    p = subprocess.run(cmd.argv + ["--eval-every", "2"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / cmd.outputs["gguf"]).is_file()
    fractions = [f for f, _ in map(parse_progress, p.stdout.splitlines()) if f is not None]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
