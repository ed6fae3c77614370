"""Calibration: per-group scale factors that turn proxy errors into predicted delta-KLD.

Why: the raw proxy (importance-weighted MSE x params) ranks tensors of different roles wrongly (on real models
it sends ffn_down to Q2_K/Q3_K, which costs far more KLD than predicted). End-to-end probes fix the scale of
each group: push one group of tensors (one class in one depth bucket) to a low type, keep everything else at
full precision, measure the mean KLD against the base model, and set

    scale(group) = measured KLD / sum over the group's tensors of (wmse x n_params at that type).

Predicted loss of a plan = sum over tensors of scale(group of tensor) x wmse x n_params, which the budget
allocator minimises. Probes are additive to first order (small, independent perturbations), which the held-out
check tests: probes *not* used in the fit (the same groups at a second type, and random mixed assignments)
are predicted and measured, and we report Spearman's rank correlation between the two.

The probe is any callable `probe(assignments: dict[tensor, type]) -> mean KLD` (verify.probe's ProbeSession
in production: chosen tensors replaced by round-tripped versions, no GGUF written; a synthetic function in
tests). Stored as JSON (`calibration.json` next to the measurement db by default).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from outputs import write_atomic
from strategy.problem import Candidates
from strategy.sizes import bits_per_weight

FORMAT = "gguf-strategy-calibration/1"
Probe = Callable[[dict[str, str]], float]


def depth_bucket(layer: int | None, n_layers: int) -> str:
    """'-' for non-block tensors; else early / mid / late by thirds of the depth."""
    if layer is None:
        return "-"
    if n_layers <= 1:
        return "early"
    r = layer / n_layers
    return "early" if r < 1 / 3 else ("mid" if r < 2 / 3 else "late")


def group_key(cls: str, layer: int | None, n_layers: int) -> str:
    return f"{cls}@{depth_bucket(layer, n_layers)}"


@dataclass
class Calibration:
    scales: dict[str, float] = field(default_factory=dict)        # "class@bucket" -> scale
    class_scales: dict[str, float] = field(default_factory=dict)  # "class" -> scale (fallback)
    global_scale: float = 1.0
    report: dict = field(default_factory=dict)
    proxy: str = "wmse"                                           # which strategy.problem.PROXIES the scales apply to
    # "class@bucket" -> {type: scale} measured by a probe at exactly that type: overrides the group scale there
    # (a type can hurt more or less than its proxy says, e.g. a symmetric 5-bit type on attn_v)
    type_scales: dict[str, dict[str, float]] = field(default_factory=dict)
    # tensor -> multiplier on its group's scale, from a single-tensor probe (layer 0 / last layer often differ
    # from their depth bucket by several x)
    tensor_scales: dict[str, float] = field(default_factory=dict)
    # proxy -> the same fit with that proxy (no report): candidates for strategy.select, which measures plans
    # built from each instead of trusting the held-out ranking of a few probes
    alternatives: dict[str, dict] = field(default_factory=dict)

    def variants(self) -> dict[str, Calibration]:
        """This calibration under its own proxy plus one per stored alternative proxy."""
        out = {self.proxy: self}
        for p, d in self.alternatives.items():
            if p != self.proxy:
                out[p] = Calibration.from_dict({**d, "format": FORMAT, "proxy": p})
        return out

    def scale(self, cls: str, layer: int | None, n_layers: int, qtype: str | None = None) -> float:
        key = group_key(cls, layer, n_layers)
        if qtype is not None:
            t = type_scale_for(self.type_scales.get(key, {}), qtype.upper())
            if t is not None:
                return t
        if key in self.scales:
            return self.scales[key]
        return self.class_scales.get(cls, self.global_scale)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "proxy": self.proxy, "scales": self.scales, "type_scales": self.type_scales,
                "tensor_scales": self.tensor_scales,
                "class_scales": self.class_scales, "global_scale": self.global_scale,
                **({"alternatives": self.alternatives} if self.alternatives else {}), "report": self.report}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<calibration>") -> Calibration:
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a calibration file (format {d.get('format')!r}, expected {FORMAT!r}); "
                             f"create one with `python -m strategy calibrate`")
        return cls(scales={k: float(v) for k, v in d.get("scales", {}).items()},
                   class_scales={k: float(v) for k, v in d.get("class_scales", {}).items()},
                   global_scale=float(d.get("global_scale", 1.0)), report=d.get("report") or {},
                   proxy=str(d.get("proxy", "wmse")),
                   type_scales={k: {t.upper(): float(x) for t, x in v.items()}
                                for k, v in (d.get("type_scales") or {}).items()},
                   tensor_scales={k: float(v) for k, v in (d.get("tensor_scales") or {}).items()},
                   alternatives=dict(d.get("alternatives") or {}))

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"{path}: cannot read calibration file ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        return cls.from_dict(d, str(path))


# Error shape decides how a type's error turns into output error: a symmetric type (no per-block minimum) leaves a
# block's offset as an error shared by all its weights, which adds up coherently in a matmul (probes on SmolLM2
# attn_v: Q5_0 at 5.5 bpw cost 4x the KLD of Q4_1 at 5.0). An unprobed type borrows the measured ratio of the
# nearest-bpw probed type of its own family, not the group's average over both families.
FAMILY = {**{t: "affine" for t in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")},
          **{t: "symmetric" for t in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q6_K")},
          **{t: "float" for t in ("F32", "F16", "BF16")}}


def type_scale_for(measured: dict[str, float], qtype: str) -> float | None:
    """The measured KLD/proxy ratio of `qtype` in a group, else that of the nearest-bpw probed type of the same
    family (see FAMILY), else None (the caller falls back to the group scale)."""
    if qtype in measured:
        return measured[qtype]
    fam = FAMILY.get(qtype)
    same = [t for t in measured if fam is not None and FAMILY.get(t) == fam]
    if not same:
        return None
    b = bits_per_weight(qtype)
    return measured[min(same, key=lambda t: (abs(bits_per_weight(t) - b), t))]


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 points."""
    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    if len(a) < 3:
        return float("nan")

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _raw(c: Candidates, proxy: str = "wmse") -> np.ndarray:
    """Uncalibrated proxy per (tensor, type); nan where unmeasured."""
    from strategy.problem import proxy_table

    return proxy_table(c, proxy)


def ladder(c: Candidates, i: int) -> list[int]:
    """Columns of tensor i's measured valid types, one per distinct bpw (the lowest-error type at that bpw),
    cheapest first: the steps a probe can push a tensor to."""
    cols = np.flatnonzero(c.valid[i] & np.isfinite(c.err[i]))
    best: dict[float, int] = {}
    for j in cols:
        b = round(bits_per_weight(c.types[j]), 4)
        if b not in best or c.err[i, j] < c.err[i, best[b]]:
            best[b] = int(j)
    return [best[b] for b in sorted(best)]


def _low_type(c: Candidates, i: int, rank: int) -> int | None:
    """Column of the `rank`-th step of tensor i's ladder (0 = cheapest), clipped to the ladder."""
    lad = ladder(c, i)
    return lad[min(rank, len(lad) - 1)] if lad else None


def single_tensors(c: Candidates, n: int, seed: int = 0) -> list[int]:
    """Tensors for single-tensor held-out probes: half where the proxies disagree most about the tensor's
    cheapest step relative to its group (the cases a group probe averages away, e.g. an ffn_down whose
    importance sits in one outlier column), half at random."""
    if n <= 0 or c.n == 0:
        return []
    from strategy.problem import PROXIES

    low = np.array([_low_type(c, i, 0) if _low_type(c, i, 0) is not None else 0 for i in range(c.n)])
    keys = [group_key(c.classes[i], c.layers[i], c.n_layers) for i in range(c.n)]
    logs = []
    for p in PROXIES:
        v = _raw(c, p)[np.arange(c.n), low]
        if not np.isfinite(v).all() or (v <= 0).any():
            continue
        lv = np.log(v)
        for k in set(keys):  # relative to the group median: the group scale absorbs the rest
            m = np.array([x == k for x in keys])
            lv[m] -= np.median(lv[m])
        logs.append(lv)
    picked: list[int] = []
    if len(logs) >= 2:
        spread = np.ptp(np.stack(logs), axis=0)
        picked = [int(i) for i in np.argsort(-spread, kind="stable")[: n // 2]]
    rng = np.random.default_rng(seed + 1)
    rest = [i for i in rng.permutation(c.n) if int(i) not in picked]
    return picked + [int(i) for i in rest[: n - len(picked)]]


LOSSLESS = ("F32", "F16", "BF16")


def plan_probes(c: Candidates, fit_ranks: tuple[int, ...] | str = (0, 2), heldout_ranks: tuple[int, ...] = (1,),
                n_random: int = 8, seed: int = 0, n_single: int = 8
                ) -> tuple[list[tuple[str, dict[str, str]]], list[tuple[str, dict[str, str]]]]:
    """(fit probes, held-out probes) as (label, assignments).

    `fit_ranks="all"`: every lossy step of each group's ladder is a fit probe (about twice the probes of the
    default; every type a plan can pick is then measured in its group, instead of extrapolated from the two
    cheapest steps), and no group is held out: singles and random mixes check the fit.

    Fit: each group (class x depth bucket) pushed to the `fit_ranks` steps of its ladder (cheapest and third
    cheapest bpw by default: a large and a moderate perturbation, so the scale holds over the range plans use).
    Held out: each group at the `heldout_ranks` steps, and `n_random` random mixes over all tensors (30% of
    tensors, each at one of its three cheapest steps), which also test additivity across groups, and
    `n_single` single tensors at their cheapest step (see `single_tensors`), which test the proxy within a group."""
    groups: dict[str, list[int]] = {}
    for i in range(c.n):
        groups.setdefault(group_key(c.classes[i], c.layers[i], c.n_layers), []).append(i)
    fit_p, held = [], []
    all_steps = fit_ranks == "all"
    if all_steps:
        fit_ranks = tuple(range(max((len(ladder(c, i)) for i in range(c.n)), default=0)))
        heldout_ranks = ()
    for key, members in sorted(groups.items()):
        for ranks, out in ((fit_ranks, fit_p), (heldout_ranks, held)):
            for rank in ranks:
                a = {}
                for i in members:
                    lad = ladder(c, i)
                    if all_steps:  # each member's own step `rank`, lossy ones only
                        j = lad[rank] if rank < len(lad) and c.types[lad[rank]] not in LOSSLESS else None
                    else:
                        j = _low_type(c, i, rank)
                    if j is not None:
                        a[c.names[i]] = c.types[j]
                if a and not any(a == prev for _, prev in fit_p + held):
                    out.append((f"{key}:step{rank}", a))
    rng = np.random.default_rng(seed)
    for i in single_tensors(c, n_single, seed):
        j = _low_type(c, i, 0)
        if j is not None:
            held.append((f"single:{c.names[i]}", {c.names[i]: c.types[j]}))
    for r in range(n_random):
        a = {}
        pick = rng.random(c.n) < 0.3
        for i in np.flatnonzero(pick):
            j = _low_type(c, int(i), int(rng.integers(0, 3)))
            if j is not None:
                a[c.names[i]] = c.types[j]
        if a:
            held.append((f"random{r}", a))
    return fit_p, held


def predict(c: Candidates, assignments: dict[str, str], cal: Calibration | None, proxy: str | None = None) -> float:
    idx = c.index()
    proxy = proxy or (cal.proxy if cal else "wmse")
    raw = _raw(c, proxy)
    total = 0.0
    for name, t in assignments.items():
        i = idx[name]
        s = cal.scale(c.classes[i], c.layers[i], c.n_layers, t) * cal.tensor_scales.get(name, 1.0) if cal else 1.0
        total += s * float(raw[i, c.types.index(t)])
    return total


def _fit_scales(c: Candidates, fit_rows: list[tuple[str, dict[str, str], float]], proxy: str) -> Calibration:
    """Per-group scale = geometric mean over the group's fit probes of measured KLD / proxy sum."""
    cal = Calibration(proxy=proxy)
    per_group: dict[str, list[float]] = {}
    for label, a, kld in fit_rows:
        p = predict(c, a, None, proxy)
        key = label.rsplit(":", 1)[0]
        per_group.setdefault(key, []).append(max(kld, 1e-9) / max(p, 1e-300))
    per_class: dict[str, list[float]] = {}
    for key, ss in per_group.items():
        cal.scales[key] = float(np.exp(np.mean(np.log(ss))))
        per_class.setdefault(key.split("@")[0], []).append(cal.scales[key])
    for cls, ss in per_class.items():
        cal.class_scales[cls] = float(np.exp(np.mean(np.log(ss))))
    if cal.scales:
        cal.global_scale = float(np.exp(np.median(np.log(list(cal.scales.values())))))
    return cal


def _type_scales(c: Candidates, rows: list[tuple[str, dict[str, str], float]], proxy: str
                 ) -> dict[str, dict[str, float]]:
    """Per group and type: measured KLD / proxy of the group probes at that type (geometric mean if several)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for label, a, kld in rows:
        if label.startswith(("random", "single")):
            continue
        key = label.rsplit(":", 1)[0]
        ratio = max(kld, 1e-9) / max(predict(c, a, None, proxy), 1e-300)
        for t in set(a.values()):
            acc.setdefault(key, {}).setdefault(t.upper(), []).append(ratio)
    return {k: {t: float(np.exp(np.mean(np.log(v)))) for t, v in d.items()} for k, d in acc.items()}


def fit(c: Candidates, probe: Probe, *, n_random: int = 8, seed: int = 0, n_single: int = 8, steps: str = "sparse",
        proxies: Iterable[str] = ("wmse", "out", "mse", "rel2"), type_scales: bool = True, tensor_scales: bool = True,
        log: Callable[[str], None] | None = None) -> Calibration:
    """Run the probes, fit per-group scales for each candidate proxy, keep the proxy whose calibrated
    predictions rank the held-out probes best (Spearman), and report the agreement of every proxy."""
    from strategy.problem import PROXIES

    if steps not in ("sparse", "all"):
        raise ValueError(f"probe steps {steps!r}: choose 'sparse' (two ladder steps per group) or 'all'")
    fit_probes, held_probes = plan_probes(c, n_random=n_random, seed=seed, n_single=n_single,
                                          **({"fit_ranks": "all"} if steps == "all" else {}))
    log = log or (lambda s: None)
    proxies = [p for p in proxies if p in PROXIES and np.isfinite(_raw(c, p)[c.valid]).any()]
    fit_rows: list[tuple[str, dict[str, str], float]] = []
    records = []
    for label, a in fit_probes:
        kld = float(probe(a))
        fit_rows.append((label, a, kld))
        records.append({"label": label, "kld": kld, "n_tensors": len(a), "use": "fit",
                        "proxy": {p: predict(c, a, None, p) for p in proxies}})
        log(f"  fit {label:34s} kld {kld:.5f}")
    held_rows = []
    for label, a in held_probes:
        kld = float(probe(a))
        held_rows.append((label, a, kld))
        log(f"  held-out {label:29s} kld {kld:.5f}")
    meas = [k for _, _, k in held_rows]
    per_proxy: dict[str, dict] = {}
    cals: dict[str, Calibration] = {}
    for p in proxies:
        cal_p = _fit_scales(c, fit_rows, p)
        pred = [predict(c, a, cal_p) for _, a, _ in held_rows]
        logerr = [abs(math.log(max(x, 1e-12) / max(y, 1e-12))) for x, y in zip(pred, meas)]
        per_proxy[p] = {"spearman_heldout": spearman(pred, meas),
                        "spearman_heldout_uncalibrated": spearman([predict(c, a, None, p) for _, a, _ in held_rows],
                                                                  meas),
                        "median_abs_log_ratio": float(np.median(logerr)) if logerr else float("nan")}
        cals[p] = cal_p
    # best held-out rank agreement; near-ties (3 decimals) go to the better magnitude, then to the listed order
    order = sorted(per_proxy, key=lambda p: (-round(float(np.nan_to_num(per_proxy[p]["spearman_heldout"], nan=-2.0)), 3),
                                              round(per_proxy[p]["median_abs_log_ratio"], 3), proxies.index(p)))
    best = order[0] if order else "wmse"
    cal = cals.get(best) or Calibration()
    for label, a, kld in held_rows:
        records.append({"label": label, "kld": kld, "n_tensors": len(a), "use": "heldout",
                        "predicted": predict(c, a, cal), "uncalibrated": predict(c, a, None, "wmse")})
    # final model: group scales from the fit probes plus, where a group was probed at a type (fit or held-out
    # group probes), that exact measured ratio; the random mixes stay unseen and check it
    for p, cal_p in cals.items():
        if type_scales:
            cal_p.type_scales = _type_scales(c, fit_rows + held_rows, p)
        if tensor_scales:
            for label, a, kld in held_rows:
                if label.startswith("single:"):
                    name = label.split(":", 1)[1]
                    cal_p.tensor_scales[name] = max(kld, 1e-9) / max(predict(c, a, cal_p), 1e-300)
    cal.alternatives = {p: {k: v for k, v in cal_p.to_dict().items() if k not in ("report", "format", "proxy")}
                        for p, cal_p in cals.items() if p != best}
    rand = [(predict(c, a, cal), k) for label, a, k in held_rows if label.startswith("random")]
    cal.report = {
        "proxy": best,
        "n_fit": len(fit_probes), "n_heldout": len(held_probes),
        "spearman_heldout": per_proxy.get(best, {}).get("spearman_heldout", float("nan")),
        "spearman_heldout_uncalibrated": spearman([predict(c, a, None, "wmse") for _, a, _ in held_rows], meas),
        "proxies": per_proxy,
        # additivity: measured / predicted KLD on the random mixes (many groups perturbed at once)
        "random_measured_over_predicted": [round(k / p, 4) if p > 0 else None for p, k in rand],
        "spearman_random_final": spearman([p for p, _ in rand], [k for _, k in rand]),
        "probes": records,
    }
    for p in order:
        r = per_proxy[p]
        log(f"  proxy {p:5s}: held-out Spearman {r['spearman_heldout']:.3f} (uncalibrated "
            f"{r['spearman_heldout_uncalibrated']:.3f}), median |log(pred/meas)| {r['median_abs_log_ratio']:.3f}"
            + ("  <- chosen" if p == best else ""))
    return cal
