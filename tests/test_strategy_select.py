"""Plan selection by measured end-to-end KLD: the unit (synthetic probe) and the CLI on a real tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from strategy.budget import allocate  # noqa: E402
from strategy.calibrate import Calibration, fit  # noqa: E402
from strategy.problem import build_candidates  # noqa: E402
from strategy.select import select_by_probe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_select_keeps_the_lowest_measured_kld_and_probes_each_plan_once():
    meas, metas = synth_model(n_layers=4, seed=3)
    c = build_candidates(meas, metas)
    budget = int(c.min_bytes() + 0.4 * (c.max_bytes() - c.min_bytes()))
    a, _ = allocate(c, budget)
    b = a.copy()
    b[0] = int(np.flatnonzero(c.valid[0])[0])  # another plan: tensor 0 at its first valid type
    calls = []

    def probe(assign):
        calls.append(dict(assign))
        return 0.5 if assign == c.types_of(b) else 1.0

    best, trials = select_by_probe(c, {"a": a, "a-again": a.copy(), "b": b}, probe)
    assert best == "b" and len(calls) == 2  # identical plans share one probe
    assert [t.kld for t in trials] == [1.0, 1.0, 0.5] and trials[0].size == c.size_of(a)
    best, _ = select_by_probe(c, {"first": a, "second": a.copy()}, lambda s: 1.0)
    assert best == "first"  # ties keep the preferred (first) candidate
    with pytest.raises(ValueError):
        select_by_probe(c, {}, probe)


def test_calibration_keeps_one_variant_per_proxy_and_round_trips(tmp_path):
    meas, metas = synth_model(n_layers=6, seed=4)
    c = build_candidates(meas, metas)
    idx = c.index()

    def probe(assign):
        return sum(c.err[idx[n], c.types.index(t)] * c.n_params[idx[n]] * 1e-6 for n, t in assign.items())

    cal = fit(c, probe, n_random=4, proxies=("wmse", "mse", "rel2"))
    v = cal.variants()
    assert set(v) == {"wmse", "mse", "rel2"} and v[cal.proxy] is cal
    for p, alt in v.items():
        assert alt.proxy == p and alt.scales and alt.type_scales
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert {p: x.scales for p, x in again.variants().items()} == {p: x.scales for p, x in v.items()}


@pytest.mark.slow
def test_cli_build_selects_by_probe_on_a_tiny_model(tiny_model, tmp_path, calibration_text, evaluation_text):
    """measure -> calibrate -> build --check-text: every proxy's plan and the stock-like mix are probed on the text,
    the lowest KLD is written and recorded in the plan."""
    from strategy.plan import load_plan

    model = tiny_model("llama")
    db = tmp_path / "m.db"

    def run(*args, module="strategy"):
        p = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode in (0, 3), p.stderr[-2000:]
        return p

    run(model, "--db", db, "--no-progress", module="measure")
    cal = tmp_path / "cal.json"
    run("calibrate", "--db", db, "--model", model, "--text", calibration_text, "--chunks", "1", "-o", cal)
    assert len(Calibration.load(cal).variants()) >= 2
    out = tmp_path / "plan.yaml"
    p = run("build", "--db", db, "--model", model, "--target-bpw", "4.5", "--calibration", cal,
            "--check-text", evaluation_text, "--check-chunks", "1", "-o", out)
    assert "select: probing" in p.stdout and "select: chose" in p.stdout, p.stdout
    sel = load_plan(out).target["selection"]
    trials = {t["label"]: t["kld"] for t in sel["trials"]}
    assert any(k.startswith("stock-like") for k in trials) and len(trials) >= 3
    assert trials[sel["chosen"]] == min(trials.values())
    p = run("build", "--db", db, "--model", model, "--target-bpw", "4.5", "--calibration", cal,
            "--check-text", evaluation_text, "--check-chunks", "1", "--no-select", "-o", tmp_path / "p2.yaml")
    assert "select:" not in p.stdout
    out3 = tmp_path / "p3.yaml"
    p = run("build", "--db", db, "--model", model, "--target-bpw", "4.5", "--calibration", cal,
            "--check-text", evaluation_text, "--check-chunks", "1", "--refine", "1", "-o", out3)
    assert "refined: probe KLD" in p.stdout, p.stdout
    refined = load_plan(out3).target
    assert refined["size"] <= refined["bytes"]
    if "refined_by_probe" in refined:  # a kept refinement measured lower than the selected plan
        assert refined["refined_by_probe"]["end"] < refined["refined_by_probe"]["start"]
    sel = refined["selection"]
    assert sel["refine"]["end"] < sel["refine"]["start"], p.stdout  # this model's refinement changes the plan
    j = sel["judge"]  # so both plans were judged on the chunks after the probe's
    assert "judge: refined" in p.stdout, p.stdout
    assert j["kept"] == ("refined" if j["refined"] < j["unrefined"] else "unrefined")
    assert ("refined_by_probe" in refined) == (j["kept"] == "refined")
    p = run("build", "--db", db, "--model", model, "--target-bpw", "4.5", "--calibration", cal,
            "--check-text", evaluation_text, "--check-chunks", "1", "--refine", "1", "--judge-chunks", "0",
            "-o", tmp_path / "p4.yaml")
    assert "judge:" not in p.stdout and "judge" not in load_plan(tmp_path / "p4.yaml").target["selection"]


def test_refine_by_probe_finds_a_group_the_calibration_underrates():
    """The truth charges ffn_down 20x what the (uncalibrated) model predicts: refining with measured KLD moves
    bytes to ffn_down, never exceeds the budget, and never returns a plan worse than the start."""
    from strategy.select import refine_by_probe

    meas, metas = synth_model(n_layers=6, seed=11)
    c = build_candidates(meas, metas)
    idx = c.index()

    def truth(assign):
        return sum((20.0 if c.classes[idx[n]] == "ffn_down" else 1.0) * c.err[idx[n], c.types.index(t)]
                   * c.n_params[idx[n]] * 1e-6 for n, t in assign.items())

    budget = int(c.min_bytes() + 0.35 * (c.max_bytes() - c.min_bytes()))
    start, _ = allocate(c, budget)
    loss_before = c.loss.copy()
    best, trials = refine_by_probe(c, start, truth, budget, rounds=3)
    assert np.array_equal(c.loss, loss_before)  # restored
    assert c.size_of(best) <= budget
    assert truth(c.types_of(best)) < 0.9 * truth(c.types_of(start))
    assert min(t.kld for t in trials) == pytest.approx(truth(c.types_of(best)))
    down = [i for i in range(c.n) if c.classes[i] == "ffn_down"]
    assert sum(c.nbytes[i, best[i]] for i in down) > sum(c.nbytes[i, start[i]] for i in down)


def test_refine_without_a_check_text_is_a_one_line_error(tmp_path):
    meas, metas = synth_model(n_layers=4, seed=3)
    import json

    (tmp_path / "m.json").write_text(json.dumps([m.to_dict() for m in meas]))
    p = subprocess.run([sys.executable, "-m", "strategy", "build", "--db", tmp_path / "m.json", "--target-bpw", "4.5",
                        "--refine", "1", "-o", tmp_path / "p.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "--refine" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("judge_agrees", [False, True])
def test_choose_plan_judge_keeps_a_refinement_only_when_it_measures_lower(judge_agrees):
    """The probe charges ffn_down 20x, so the refinement moves bytes there. A judge that prices like the model
    (under which the unrefined plan is optimal) keeps the start; a judge that agrees with the probe keeps the
    refinement. Both plans are judged once, and the record says which was kept."""
    from strategy.build import build
    from strategy.select import choose_plan

    meas, metas = synth_model(n_layers=6, seed=11)
    c0 = build_candidates(meas, metas)
    budget = int(c0.min_bytes() + 0.35 * (c0.max_bytes() - c0.min_bytes()))
    start = build(meas, metas, method="budget", target_size=budget)
    c, idx = start.cands, start.cands.index()

    def priced(weight_down: float):
        def probe(assign):
            return sum((weight_down if c.classes[idx[n]] == "ffn_down" else 1.0) * c.loss[idx[n], c.types.index(t)]
                       for n, t in assign.items())
        return probe

    judged = []

    def make_judge():
        inner = priced(20.0 if judge_agrees else 1.0)

        def judge(assign):
            judged.append(assign)
            return inner(assign)
        return judge

    chosen, record = choose_plan({"a": start}, priced(20.0), budget=budget, refine_rounds=1, judge=make_judge)
    assert record["refine"]["end"] < record["refine"]["start"]  # the refinement changed the plan
    assert len(judged) == 2 and record["judge"]["kept"] == ("refined" if judge_agrees else "unrefined")
    assert record["judge"]["refined"] != record["judge"]["unrefined"]
    if judge_agrees:
        assert chosen is not start and "refined_by_probe" in chosen.plan.target
    else:
        assert chosen is start and np.array_equal(chosen.choice, start.choice)
    assert chosen.plan.target["selection"]["judge"] == record["judge"]
    assert chosen.size <= budget


def test_choose_plan_does_not_load_a_judge_when_the_refinement_kept_the_plan():
    from strategy.build import build
    from strategy.select import choose_plan

    meas, metas = synth_model(n_layers=4, seed=3)
    c0 = build_candidates(meas, metas)
    budget = int(c0.min_bytes() + 0.4 * (c0.max_bytes() - c0.min_bytes()))
    start = build(meas, metas, method="budget", target_size=budget)
    first = start.cands.types_of(start.choice)

    def start_is_best(assign):  # every other plan measures worse: the refinement keeps the start
        return 0.0 if assign == first else 1.0

    def no_judge():
        raise AssertionError("the judge was loaded")

    chosen, record = choose_plan({"a": start}, start_is_best, budget=budget, refine_rounds=1, judge=no_judge)
    assert chosen is start and "judge" not in record
