"""Calibration against a synthetic end-to-end probe whose true per-class sensitivities differ from the proxy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from strategy.budget import allocate  # noqa: E402
from strategy.calibrate import Calibration, depth_bucket, fit, spearman  # noqa: E402
from strategy.problem import build_candidates  # noqa: E402

# "true" KLD per unit of proxy: ffn_down and late layers hurt far more than the proxy says
TRUE = {"ffn_down": 30.0, "attn_v": 5.0, "token_embd": 0.2}


def make_probe(c, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    idx = c.index()

    def probe(assign: dict[str, str]) -> float:
        total = 0.0
        for name, t in assign.items():
            i = idx[name]
            depth = 1.0 + 2.0 * (c.layers[i] or 0) / max(1, c.n_layers - 1)
            total += TRUE.get(c.classes[i], 1.0) * depth * c.err[i, c.types.index(t)] * c.n_params[i] * 1e-6
        return total * float(rng.lognormal(0, noise))

    return probe


def true_kld(c, choice):
    probe = make_probe(c, noise=0.0)
    return probe(c.types_of(choice))


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-5)


def test_depth_bucket():
    assert [depth_bucket(i, 9) for i in (0, 3, 6, 8)] == ["early", "mid", "late", "late"]
    assert depth_bucket(None, 9) == "-"


def test_fit_recovers_scales_and_predicts_held_out_probes(tmp_path):
    meas, metas = synth_model(n_layers=9, seed=4)
    c = build_candidates(meas, metas)
    cal = fit(c, make_probe(c), n_random=10)
    r = cal.report
    assert r["n_fit"] > 0 and r["n_heldout"] >= 10
    assert r["spearman_heldout"] >= 0.9
    assert r["spearman_heldout"] > r["spearman_heldout_uncalibrated"]
    # ffn_down's fitted scale reflects its true 30x sensitivity relative to attn_q (same depth bucket)
    ratio = cal.scales["ffn_down@mid"] / cal.scales["attn_q@mid"]
    assert 20 < ratio < 45
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = Calibration.load(path)
    assert again.scales == cal.scales and again.report["spearman_heldout"] == r["spearman_heldout"]


def test_calibrated_budget_beats_uncalibrated_on_true_kld():
    meas, metas = synth_model(n_layers=9, seed=5)
    c_raw = build_candidates(meas, metas)
    cal = fit(c_raw, make_probe(c_raw), n_random=4)
    c_cal = build_candidates(meas, metas, calibration=cal)
    for frac in (0.1, 0.25, 0.5):
        budget = int(c_raw.min_bytes() + frac * (c_raw.max_bytes() - c_raw.min_bytes()))
        ch_raw, _ = allocate(c_raw, budget)
        ch_cal, _ = allocate(c_cal, budget)
        assert c_cal.size_of(ch_cal) <= budget
        assert true_kld(c_raw, ch_cal) < 0.9 * true_kld(c_raw, ch_raw)


def test_bad_calibration_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a calibration file"):
        Calibration.load(p)


def test_fit_chooses_the_proxy_that_ranks_held_out_probes_best():
    """When the true loss follows the activation energy (err x params x mean importance), the "out" proxy wins
    the held-out ranking and is the one stored; wmse alone (blind to activation scale) ranks worse."""
    meas, metas = synth_model(n_layers=9, seed=6)
    rng = np.random.default_rng(1)
    names = sorted({m.tensor for m in meas})
    act = {n: float(10 ** rng.uniform(-2, 1)) for n in names}
    c = build_candidates(meas, metas, importance=act)
    idx = c.index()

    def probe(assign: dict[str, str]) -> float:
        return sum(TRUE.get(c.classes[idx[n]], 1.0) * c.err[idx[n], c.types.index(t)] * c.n_params[idx[n]]
                   * act[n] * 1e-6 for n, t in assign.items())

    cal = fit(c, probe, n_random=8)
    r = cal.report
    assert cal.proxy == "out" and r["proxy"] == "out"
    assert r["proxies"]["out"]["spearman_heldout"] > r["proxies"]["wmse"]["spearman_heldout"]
    assert r["proxies"]["out"]["median_abs_log_ratio"] < 0.05
    # the stored calibration reproduces the choice and predicts with it
    again = Calibration.from_dict(cal.to_dict())
    assert again.proxy == "out"
    c2 = build_candidates(meas, metas, importance=act, calibration=again)
    i = idx[names[0]]
    j = int(np.flatnonzero(c2.valid[i])[0])
    s = again.scale(c.classes[i], c.layers[i], c.n_layers)
    assert c2.loss[i, j] == pytest.approx(s * c.err[i, j] * c.n_params[i] * act[names[0]])


def test_single_tensor_probes_expose_an_outlier_wmse():
    """A tensor whose importance sits in one outlier column gets a tiny weighted MSE at its cheapest type while
    the rest of its weights are as damaged as its neighbours' (seen on SmolLM2's blk.11.ffn_down). Group probes
    average that away; the single-tensor held-out probes see it, so the fit prefers the plain-MSE proxy."""
    import dataclasses

    meas, metas = synth_model(n_layers=9, seed=7)
    out = {"blk.4.ffn_down.weight", "blk.7.ffn_down.weight"}
    from strategy.sizes import bits_per_weight

    cheapest = min({m.qtype for m in meas}, key=bits_per_weight)
    meas = [dataclasses.replace(m, wmse=m.wmse * 1e-3) if m.tensor in out and m.qtype == cheapest else m
            for m in meas]
    c = build_candidates(meas, metas)
    idx = c.index()

    def probe(assign: dict[str, str]) -> float:  # the truth follows the plain MSE (rmse^2)
        return sum(TRUE.get(c.classes[idx[n]], 1.0) * c.proxies["mse"][idx[n], c.types.index(t)] * 1e-6
                   for n, t in assign.items())

    cal = fit(c, probe, n_random=6, n_single=6)
    singles = [r["label"] for r in cal.report["probes"] if r["label"].startswith("single")]
    assert out & {lab.split(":", 1)[1] for lab in singles}
    assert cal.proxy in ("mse", "rel2")
    r = cal.report["proxies"]
    assert r[cal.proxy]["spearman_heldout"] > r["wmse"]["spearman_heldout"]


def test_all_steps_measures_every_lossy_type_and_family_fallback():
    """A truth where symmetric types cost 4x what their proxy says (a block offset they cannot hold adds up
    coherently in the matmul): sparse probing measures two steps per group and extrapolates; probing every
    step measures each type a plan can pick, and the calibrated allocator then beats the sparse one."""
    from strategy.calibrate import FAMILY, LOSSLESS, ladder, type_scale_for

    meas, metas = synth_model(n_layers=9, seed=8)
    c = build_candidates(meas, metas)
    idx = c.index()

    def probe(assign: dict[str, str]) -> float:
        return sum((4.0 if FAMILY.get(t) == "symmetric" else 1.0) * TRUE.get(c.classes[idx[n]], 1.0)
                   * c.err[idx[n], c.types.index(t)] * c.n_params[idx[n]] * 1e-6 for n, t in assign.items())

    sparse = fit(c, probe, n_random=6, proxies=("wmse",))
    full = fit(c, probe, n_random=6, proxies=("wmse",), steps="all")
    assert full.report["n_fit"] > sparse.report["n_fit"]
    assert not any(r["label"].split(":")[-1].startswith("step") for r in full.report["probes"] if r["use"] == "heldout")
    i = idx["blk.4.attn_q.weight"]
    key = "attn_q@mid"
    lossy = {c.types[j] for j in ladder(c, i) if c.types[j] not in LOSSLESS}
    assert lossy <= set(full.type_scales[key])
    # exact per-type ratios: symmetric 4x affine within the group
    sym = [t for t in lossy if FAMILY.get(t) == "symmetric"]
    aff = [t for t in lossy if FAMILY.get(t) == "affine"]
    assert sym and aff
    assert full.type_scales[key][sym[0]] / full.type_scales[key][aff[0]] == pytest.approx(4.0, rel=1e-6)
    # an unprobed type borrows from its own family, nearest in bpw
    assert type_scale_for({"Q4_0": 2.0, "Q4_1": 0.5}, "Q5_1") == 0.5
    assert type_scale_for({"Q4_0": 2.0, "Q8_0": 3.0, "Q4_1": 0.5}, "Q5_0") == 2.0
    assert type_scale_for({"Q4_1": 0.5}, "Q6_K") is None
    with pytest.raises(ValueError, match="probe steps"):
        fit(c, probe, steps="most")
    # on the true loss, the all-steps calibration allocates at least as well as the sparse one
    worse = 0
    for frac in (0.15, 0.3, 0.5, 0.7):
        budget = int(c.min_bytes() + frac * (c.max_bytes() - c.min_bytes()))
        ch_s, _ = allocate(build_candidates(meas, metas, calibration=sparse), budget)
        ch_f, _ = allocate(build_candidates(meas, metas, calibration=full), budget)
        worse += probe(c.types_of(ch_f)) > probe(c.types_of(ch_s)) * 1.001
    assert worse == 0
