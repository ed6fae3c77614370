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

import numpy as np

from strategy.problem import Candidates

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
