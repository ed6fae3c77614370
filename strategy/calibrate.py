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

    def scale(self, cls: str, layer: int | None, n_layers: int) -> float:
        key = group_key(cls, layer, n_layers)
        if key in self.scales:
            return self.scales[key]
        return self.class_scales.get(cls, self.global_scale)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "scales": self.scales, "class_scales": self.class_scales,
                "global_scale": self.global_scale, "report": self.report}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<calibration>") -> Calibration:
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a calibration file (format {d.get('format')!r}, expected {FORMAT!r}); "
                             f"create one with `python -m strategy calibrate`")
        return cls(scales={k: float(v) for k, v in d.get("scales", {}).items()},
                   class_scales={k: float(v) for k, v in d.get("class_scales", {}).items()},
                   global_scale=float(d.get("global_scale", 1.0)), report=d.get("report") or {})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

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


def _raw(c: Candidates) -> np.ndarray:
    """Uncalibrated proxy per (tensor, type): wmse x n_params; nan where unmeasured."""
    return c.err * c.n_params[:, None].astype(np.float64)


def _low_type(c: Candidates, i: int, rank: int) -> int | None:
    """Column of the `rank`-th cheapest measured valid type of tensor i (0 = cheapest)."""
    cols = np.flatnonzero(c.valid[i] & np.isfinite(c.err[i]))
    if len(cols) == 0:
        return None
    cols = cols[np.argsort([bits_per_weight(c.types[j]) for j in cols], kind="stable")]
    return int(cols[min(rank, len(cols) - 1)])


def plan_probes(c: Candidates, fit_rank: int = 0, heldout_rank: int = 1, n_random: int = 8,
                seed: int = 0) -> tuple[list[tuple[str, dict[str, str]]], list[tuple[str, dict[str, str]]]]:
    """(fit probes, held-out probes) as (label, assignments). One fit probe per group at its cheapest type;
    held out: each group at its second-cheapest type, and `n_random` random mixes over all tensors."""
    groups: dict[str, list[int]] = {}
    for i in range(c.n):
        groups.setdefault(group_key(c.classes[i], c.layers[i], c.n_layers), []).append(i)
    fit, held = [], []
    for key, members in sorted(groups.items()):
        for rank, out in ((fit_rank, fit), (heldout_rank, held)):
            a = {}
            for i in members:
                j = _low_type(c, i, rank)
                if j is not None:
                    a[c.names[i]] = c.types[j]
            if a:
                out.append((f"{key}:{'low' if out is fit else 'second'}", a))
    rng = np.random.default_rng(seed)
    for r in range(n_random):
        a = {}
        pick = rng.random(c.n) < 0.3
        for i in np.flatnonzero(pick):
            j = _low_type(c, int(i), int(rng.integers(0, 3)))
            if j is not None:
                a[c.names[i]] = c.types[j]
        if a:
            held.append((f"random{r}", a))
    return fit, held


def predict(c: Candidates, assignments: dict[str, str], cal: Calibration | None) -> float:
    idx = c.index()
    raw = _raw(c)
    total = 0.0
    for name, t in assignments.items():
        i = idx[name]
        s = cal.scale(c.classes[i], c.layers[i], c.n_layers) if cal else 1.0
        total += s * float(raw[i, c.types.index(t)])
    return total


def fit(c: Candidates, probe: Probe, *, n_random: int = 8, seed: int = 0,
        log: Callable[[str], None] | None = None) -> Calibration:
    """Run the probes, fit the per-group scales, and report held-out agreement (Spearman, uncalibrated too)."""
    fit_probes, held_probes = plan_probes(c, n_random=n_random, seed=seed)
    log = log or (lambda s: None)
    cal = Calibration()
    records = []
    per_class: dict[str, list[float]] = {}
    for label, a in fit_probes:
        kld = float(probe(a))
        proxy = predict(c, a, None)
        key = label.rsplit(":", 1)[0]
        s = max(kld, 1e-12) / max(proxy, 1e-300)
        cal.scales[key] = s
        per_class.setdefault(key.split("@")[0], []).append(s)
        records.append({"label": label, "kld": kld, "proxy": proxy, "use": "fit"})
        log(f"  fit {label:32s} kld {kld:.5f}  proxy {proxy:.4g}  scale {s:.4g}")
    for cls, ss in per_class.items():
        cal.class_scales[cls] = float(np.exp(np.mean(np.log(ss))))
    if cal.scales:
        cal.global_scale = float(np.exp(np.median(np.log(list(cal.scales.values())))))
    meas, pred, pred_raw = [], [], []
    for label, a in held_probes:
        kld = float(probe(a))
        p = predict(c, a, cal)
        meas.append(kld)
        pred.append(p)
        pred_raw.append(predict(c, a, None))
        records.append({"label": label, "kld": kld, "predicted": p, "use": "heldout"})
        log(f"  held-out {label:27s} kld {kld:.5f}  predicted {p:.5f}")
    cal.report = {
        "n_fit": len(fit_probes), "n_heldout": len(held_probes),
        "spearman_heldout": spearman(pred, meas),
        "spearman_heldout_uncalibrated": spearman(pred_raw, meas),
        "probes": records,
    }
    return cal
