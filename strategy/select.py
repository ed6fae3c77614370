"""Choose among candidate plans of the same budget by measured end-to-end KLD, not by the model that made them.

Why: a calibration is a model (proxy x per-group, per-type scales, assumed additive). Several fits are plausible
(one per proxy; sparse or every-step probes), the held-out ranking that picks one rests on a handful of probes,
and a small error in a per-type ratio can send a whole class to a type that hurts (seen on SmolLM2: a fit that
made Q3_K look cheap for `ffn_down` lost 18% at the Q3_K_M size to the fit it replaced). Measuring each
candidate plan once with the probe engine (the same held-out text the calibration used, never the evaluation
text) costs one forward per candidate and makes the measured KLD the judge. The stock-like mix of the same size
is always a candidate, so the chosen plan never loses to it on the probe text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from strategy.problem import Candidates

if TYPE_CHECKING:
    from strategy.build import BuildResult

Probe = Callable[[dict[str, str]], float]


@dataclass
class Trial:
    label: str
    size: int
    predicted: float
    kld: float


def select_by_probe(c: Candidates, candidates: Mapping[str, np.ndarray], probe: Probe,
                    log: Callable[[str], None] | None = None) -> tuple[str, list[Trial]]:
    """(label of the lowest measured KLD, every trial). Identical plans are probed once; ties keep the first
    label (list the preferred candidate first)."""
    if not candidates:
        raise ValueError("select_by_probe: no candidate plans")
    log = log or (lambda s: None)
    seen: dict[bytes, float] = {}
    trials: list[Trial] = []
    for label, choice in candidates.items():
        key = np.asarray(choice, dtype=np.int64).tobytes()
        if key not in seen:
            seen[key] = float(probe(c.types_of(choice)))
        t = Trial(label, int(c.size_of(choice)), float(c.loss_of(choice)), seen[key])
        trials.append(t)
        log(f"  candidate {label:28s} {t.size} bytes  probe KLD {t.kld:.5f}")
    best = min(trials, key=lambda t: t.kld)  # min keeps the first of equal values
    return best.label, trials


def refine_by_probe(c: Candidates, choice: np.ndarray, probe: Probe, budget: int, *,
                    factors: tuple[float, ...] = (4.0, 0.25), rounds: int = 1,
                    log: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[Trial]]:
    """Coordinate descent on one loss multiplier per group (tensor class x depth third), judged by the probe.

    Why: the calibration's per-group costs come from probes of one group at a time; in a whole plan the groups
    interact (and the fit has errors). For each group in turn, its predicted loss is scaled by each factor, the
    allocator re-solves the same budget, and the new plan is kept only if its measured probe KLD is lower. Costs
    one probe per (group, factor) and round; c.loss is restored afterwards. Returns (best choice, every trial)."""
    from strategy.budget import allocate
    from strategy.calibrate import group_key

    log = log or (lambda s: None)
    keys = [group_key(c.classes[i], c.layers[i], c.n_layers) for i in range(c.n)]
    mult = dict.fromkeys(sorted(set(keys)), 1.0)
    base = c.loss.copy()
    best = np.asarray(choice).copy()
    best_kld = float(probe(c.types_of(best)))
    trials = [Trial("start", int(c.size_of(best)), float(c.loss_of(best)), best_kld)]
    try:
        for r in range(rounds):
            improved = False
            for g in list(mult):
                for f in factors:
                    m = np.array([mult[k] * (f if k == g else 1.0) for k in keys])
                    c.loss = base * m[:, None]
                    ch, _ = allocate(c, budget)
                    if np.array_equal(ch, best):
                        continue
                    k = float(probe(c.types_of(ch)))
                    trials.append(Trial(f"round{r}:{g}x{f:g}", int(c.size_of(ch)), float(c.loss_of(ch)), k))
                    if k < best_kld:
                        log(f"  refine {g} x{f:g}: probe KLD {best_kld:.5f} -> {k:.5f}")
                        best, best_kld, mult[g], improved = ch, k, mult[g] * f, True
                        break
            if not improved:
                break
    finally:
        c.loss = base
    return best, trials


def choose_plan(results: Mapping[str, BuildResult], probe: Probe, *, budget: int | None = None,
                stock: tuple[str, np.ndarray] | None = None, build_stock: Callable[[str], BuildResult] | None = None,
                refine_rounds: int = 0, judge: Callable[[], Probe] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[BuildResult, dict]:
    """The plan to write: every calibrated result (same budget) and the stock-like `(mix, choice)` probed once,
    the lowest KLD kept and, when it is a calibrated plan, refined by `refine_rounds` of refine_by_probe.
    `build_stock(mix)` makes the stock-like result if it wins. When the refinement changed the plan and `judge`
    is given (it makes a probe on other text than `probe`'s; called only then, as a session is costly to load),
    the judge measures the refined and the unrefined plan and the lower is kept: 35-40 probe-judged steps can
    fit the noise of a few probe chunks.
    Returns (chosen, record); the record is also stored as the plan's target["selection"]."""
    log = log or (lambda s: None)
    c = next(iter(results.values())).cands
    choices = {k: r.choice for k, r in results.items()}
    if stock is not None:
        choices[f"stock-like {stock[0]}"] = stock[1]
    best, trials = select_by_probe(c, choices, probe, log=log)
    record: dict = {"chosen": best, "trials": [t.__dict__ for t in trials]}
    if best not in results:
        if stock is None or build_stock is None:
            raise ValueError("choose_plan: the stock-like candidate won but no build_stock was given")
        chosen = build_stock(stock[0])
    else:
        chosen = results[best]
        if refine_rounds > 0 and budget is not None:
            start = chosen
            chosen, record["refine"] = _refined(chosen, probe, budget, refine_rounds, log)
            if judge is not None and chosen is not start:
                chosen, record["judge"] = _judged(start, chosen, judge, log)
    chosen.plan.target["selection"] = record
    return chosen, record


def _judged(start: BuildResult, refined: BuildResult, make_judge: Callable[[], Probe],
            log: Callable[[str], None]) -> tuple[BuildResult, dict]:
    """The refined plan only if the judge measures it lower than its start (a tie keeps the start)."""
    judge = make_judge()
    k = {name: float(judge(r.cands.types_of(r.choice))) for name, r in (("refined", refined), ("unrefined", start))}
    kept = "refined" if k["refined"] < k["unrefined"] else "unrefined"
    log(f"  judge: refined {k['refined']:.5f}, unrefined {k['unrefined']:.5f} -> {kept} kept")
    return (refined if kept == "refined" else start), {**k, "kept": kept}


def _refined(res: BuildResult, probe: Probe, budget: int, rounds: int, log: Callable[[str], None]
             ) -> tuple[BuildResult, dict]:
    from strategy.build import BuildResult, make_plan

    c = res.cands
    ch, steps = refine_by_probe(c, res.choice, probe, budget, rounds=rounds, log=log)
    info = {"start": steps[0].kld, "end": min(t.kld for t in steps), "probes": len(steps)}
    log(f"  refined: probe KLD {info['start']:.5f} -> {info['end']:.5f} ({info['probes']} probes)")
    if np.array_equal(ch, res.choice):
        return res, info
    keep = {k: v for k, v in res.plan.target.items() if k in ("bytes", "bpw_target", "calibrated")}
    plan = make_plan(c, ch, res.plan.method, keep, res.plan.model)
    plan.target["refined_by_probe"] = info
    return BuildResult(plan, ch, c, c.size_of(ch), c.loss_of(ch), list(res.messages)), info
