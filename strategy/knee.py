"""Knee allocator: per tensor, the cheapest type past the point where its error curve stops paying off.

Why: without a size target, a person wants "as small as possible while nothing is visibly damaged". The
error of a tensor falls steeply from 2-bit to ~4-bit types and then flattens; the knee of that curve is the
natural stopping point, and tensors that matter more are allowed further up the flat part.

Method, per tensor:

1. Order the candidate types by bits per weight and drop dominated ones (more bits, not less error).
2. Normalise the curve to the unit square: x = (bpw - bpw_min) / (bpw_max - bpw_min),
   y = (err - err_min) / (err_max - err_min). The knee is the point farthest below the chord from the first
   point to the last (Kneedle): there the curve bends most, from steep to flat. (A concave curve, flat and
   then a late drop, bends most where the drop starts; we then take the type just above that point.)
3. Importance-dependent threshold: the knee fixes the *minimum*. A tensor whose predicted loss at the knee
   (importance-weighted error x params x calibration scale) is above `tolerance` x the median of all tensors'
   knee losses keeps moving up until its loss drops below that threshold (or the types run out). Important
   tensors thus get more bits; unimportant ones stop at their knee.

Worked example (one tensor, wmse measured per type):

    type    bpw    wmse     x      y       chord - y   (chord: y = 1 - x)
    Q2_K    2.625  1.00e-2  0.000  1.000   0.000
    Q3_K    3.438  3.10e-3  0.138  0.309   0.552
    Q4_K    4.500  8.00e-4  0.319  0.079   0.602   <- knee (largest distance below the chord)
    Q5_K    5.500  2.10e-4  0.489  0.020   0.491
    Q6_K    6.562  6.00e-5  0.670  0.005   0.325
    Q8_0    8.500  1.00e-5  1.000  0.000   0.000

The knee is Q4_K. If this tensor's loss at Q4_K is 5x the median knee loss and tolerance is 2, it moves to
Q5_K (loss ratio 5 x 2.1e-4/8e-4 = 1.3 <= 2) and stops there. See docs/knee.md for a plot.
"""

from __future__ import annotations

import numpy as np

from strategy.problem import Candidates
from strategy.sizes import bits_per_weight


def knee_index(bpw: np.ndarray, err: np.ndarray) -> int:
    """Index (into the given arrays, sorted by bpw, non-dominated) of the point farthest below the chord."""
    n = len(bpw)
    if n <= 2:
        return 0 if n == 1 or err[0] <= err[-1] else n - 1
    x = (bpw - bpw[0]) / max(bpw[-1] - bpw[0], 1e-12)
    # log-free normalisation: the chord is from (0, 1) to (1, 0)
    y = (err - err[-1]) / max(err[0] - err[-1], 1e-300)
    dist = (1.0 - x) - y
    if dist.max() > 1e-12:
        return int(np.argmax(dist))
    # concave curve (the error only drops late): it bends most at the point farthest above the chord, where
    # the drop starts; the type just above that point is the one that gets the drop
    return min(int(np.argmax(-dist)) + 1, n - 1)


def pareto_order(bpw: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices sorted by bpw keeping only points that lower the error (the non-dominated staircase)."""
    order = np.lexsort((err, bpw))
    keep = []
    best = np.inf
    for j in order:
        if err[j] < best:
            keep.append(j)
            best = err[j]
    return np.array(keep, dtype=np.int64)


def allocate_knee(c: Candidates, tolerance: float = 2.0) -> tuple[np.ndarray, dict[str, dict]]:
    """Choice per tensor (column index into c.types) and per-tensor notes (knee type, final type, why)."""
    bpw_all = np.array([bits_per_weight(t) for t in c.types])
    choice = np.zeros(c.n, dtype=np.int64)
    knee_cols = np.zeros(c.n, dtype=np.int64)
    stairs: list[np.ndarray] = []
    for i in range(c.n):
        cols = np.flatnonzero(c.valid[i] & np.isfinite(c.err[i]))
        if len(cols) == 0:  # only a pinned, unmeasured type is left
            cols = np.flatnonzero(c.valid[i])
            stairs.append(cols)
            knee_cols[i] = cols[0]
            continue
        keep = cols[pareto_order(bpw_all[cols], c.err[i, cols])]
        stairs.append(keep)
        knee_cols[i] = keep[knee_index(bpw_all[keep], c.err[i, keep])]
    knee_loss = c.loss[np.arange(c.n), knee_cols]
    finite = knee_loss[np.isfinite(knee_loss) & (knee_loss > 0)]
    threshold = tolerance * float(np.median(finite)) if len(finite) else np.inf
    notes: dict[str, dict] = {}
    for i in range(c.n):
        keep = stairs[i]
        pos = int(np.flatnonzero(keep == knee_cols[i])[0])
        while pos + 1 < len(keep) and c.loss[i, keep[pos]] > threshold:
            pos += 1
        choice[i] = keep[pos]
        notes[c.names[i]] = {"knee": c.types[int(knee_cols[i])],
                             "raised": c.types[int(choice[i])] != c.types[int(knee_cols[i])]}
    return choice, notes


def knee_svg(types: list[str], err: list[float], chosen: str | None = None, width: int = 560,
             height: int = 340) -> str:
    """An SVG plot of one tensor's normalised error curve, its chord and its knee (docs, web UI)."""
    bpw = np.array([bits_per_weight(t) for t in types])
    e = np.asarray(err, dtype=float)
    k = knee_index(bpw, e)
    x = (bpw - bpw[0]) / max(bpw[-1] - bpw[0], 1e-12)
    y = (e - e[-1]) / max(e[0] - e[-1], 1e-300)
    pad_l, pad_r, pad_t, pad_b = 60, 20, 20, 50

    def px(xv: float) -> float:
        return pad_l + xv * (width - pad_l - pad_r)

    def py(yv: float) -> float:
        return pad_t + (1 - yv) * (height - pad_t - pad_b)

    pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(0)}" stroke="#444"/>',
           f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(0)}" y2="{py(1)}" stroke="#444"/>',
           f'<line x1="{px(0)}" y1="{py(1)}" x2="{px(1)}" y2="{py(0)}" stroke="#999" stroke-dasharray="5,4"/>',
           f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>',
           f'<line x1="{px(x[k]):.1f}" y1="{py(y[k]):.1f}" x2="{px(x[k]):.1f}" y2="{py(1 - x[k]):.1f}" '
           f'stroke="#d62728" stroke-width="1.5"/>']
    for i, t in enumerate(types):
        col = "#d62728" if i == k else "#1f77b4"
        out.append(f'<circle cx="{px(x[i]):.1f}" cy="{py(y[i]):.1f}" r="{6 if i == k else 4}" fill="{col}"/>')
        out.append(f'<text x="{px(x[i]):.1f}" y="{height - pad_b + 18}" text-anchor="middle">{t}</text>')
        out.append(f'<text x="{px(x[i]):.1f}" y="{height - pad_b + 32}" text-anchor="middle" fill="#666">'
                   f'{bpw[i]:.2f}</text>')
    out.append(f'<text x="{px(x[k]) + 8:.1f}" y="{py(y[k]) - 8:.1f}" fill="#d62728">knee: {types[k]}</text>')
    if chosen and chosen != types[k]:
        j = types.index(chosen)
        out.append(f'<circle cx="{px(x[j]):.1f}" cy="{py(y[j]):.1f}" r="8" fill="none" stroke="#2ca02c" '
                   f'stroke-width="2"/><text x="{px(x[j]) + 10:.1f}" y="{py(y[j]) - 10:.1f}" fill="#2ca02c">'
                   f'raised: {chosen}</text>')
    out.append(f'<text x="{pad_l - 8}" y="{py(1) + 4:.1f}" text-anchor="end">1</text>')
    out.append(f'<text x="{pad_l - 8}" y="{py(0) + 4:.1f}" text-anchor="end">0</text>')
    out.append(f'<text transform="translate(16,{(height - pad_b) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'normalised error</text>')
    out.append('</svg>')
    return "\n".join(out) + "\n"
