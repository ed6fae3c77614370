"""Budget allocator: the types that minimise predicted loss for a file-size budget (multiple-choice knapsack).

Why this method: with one "pick exactly one type per tensor" choice and a single byte budget, the Lagrangian
relaxation min_choice sum_i (loss_i + lambda * bytes_i) decomposes per tensor and only ever picks points on
each tensor's lower convex hull in (bytes, loss). Bisection over lambda finds the largest hull solution that
fits; the bytes it leaves unspent (less than one hull step of one tensor, typically) are then filled greedily
by the best loss decrease per byte among the upgrades that still fit, so the result never exceeds the budget
and is within the "hull gap" of the optimum: ours - optimum <= ours - LP bound, and the LP bound (the dual
value at the optimal lambda) is returned so callers can report it.

Everything is vectorised over the (tensors x types) table: 10,000 tensors x 15 types solve in well under a
second (benchmarks/bench_strategy_solve.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from strategy.problem import Candidates, StrategyError


@dataclass
class Solution:
    choice: np.ndarray       # (n_items,) column index per item
    loss: float
    bytes: int               # item bytes (without any fixed part)
    lower_bound: float       # LP/dual lower bound on the optimum loss for this budget
    lam: float               # the Lagrange multiplier of the hull solution the fill started from


def lagrangian_choice(nbytes: np.ndarray, loss: np.ndarray, lam: float) -> np.ndarray:
    """argmin_k loss + lam * bytes per row; invalid entries carry loss = inf. Ties go to the lower column."""
    return np.argmin(loss + lam * nbytes, axis=1)


def solve_mckp(nbytes: np.ndarray, loss: np.ndarray, budget: int, *, iters: int = 100) -> Solution:
    """Pick one column per row minimising sum(loss) with sum(bytes) <= budget.

    nbytes: (n, K) integers (anything for invalid entries), loss: (n, K) with inf where a choice is invalid.
    Raises StrategyError when even the smallest choice per row exceeds the budget.
    """
    nbytes = np.asarray(nbytes, dtype=np.int64)
    loss = np.asarray(loss, dtype=np.float64)
    n = nbytes.shape[0]
    rows = np.arange(n)
    valid = np.isfinite(loss)
    if n == 0:
        return Solution(np.zeros(0, dtype=np.int64), 0.0, 0, 0.0, 0.0)
    if not valid.any(axis=1).all():
        bad = int(np.flatnonzero(~valid.any(axis=1))[0])
        raise StrategyError(f"item {bad} has no valid choice")
    bf = np.where(valid, nbytes, 0).astype(np.float64)
    big = np.where(valid, nbytes, np.iinfo(np.int64).max)
    # smallest choice per row, least loss among equally small ones
    minb = big.min(axis=1)
    tie = np.where(big == minb[:, None], loss, np.inf)
    smallest = np.argmin(tie, axis=1)
    if int(nbytes[rows, smallest].sum()) > budget:
        raise StrategyError(f"budget of {budget} bytes is below the smallest possible size "
                            f"{int(nbytes[rows, smallest].sum())}")

    def total(ch: np.ndarray) -> int:
        return int(nbytes[rows, ch].sum())

    # scale lambda to the data so bisection in log space starts in the right decade
    finite_loss = np.where(valid, loss, np.nan)
    span_l = np.nanmax(finite_loss) - np.nanmin(finite_loss)
    span_b = max(1.0, float(bf.max()))
    lam_hi = max(span_l, 1e-300) / 1.0  # loss step per single byte can never exceed the loss span
    ch_hi = lagrangian_choice(bf, loss, lam_hi)
    while total(ch_hi) > budget:
        lam_hi *= 4.0
        ch_hi = lagrangian_choice(bf, loss, lam_hi)
        if lam_hi > 1e300:  # only ties in loss remain: fall back to the smallest choice
            ch_hi = smallest
            break
    ch0 = lagrangian_choice(bf, loss, 0.0)
    if total(ch0) <= budget:
        ch_hi, lam_hi, lam_lo = ch0, 0.0, 0.0
    else:
        lam_lo = lam_hi * 1e-30 / span_b
        ch_lo = lagrangian_choice(bf, loss, lam_lo)
        while total(ch_lo) <= budget and lam_lo > 1e-300:
            lam_hi, ch_hi = lam_lo, ch_lo
            lam_lo *= 1e-10
            ch_lo = lagrangian_choice(bf, loss, lam_lo)
        for _ in range(iters):
            mid = float(np.sqrt(lam_lo * lam_hi)) if lam_lo > 0 else lam_hi / 2
            if not (lam_lo < mid < lam_hi):
                break
            ch = lagrangian_choice(bf, loss, mid)
            if total(ch) <= budget:
                lam_hi, ch_hi = mid, ch
            else:
                lam_lo = mid
            if lam_hi - lam_lo <= 1e-12 * lam_hi:
                break
    bound = dual_bound(bf, loss, budget, lam_hi)
    if lam_lo > 0:
        bound = max(bound, dual_bound(bf, loss, budget, lam_lo))
    choice = greedy_fill(nbytes, loss, ch_hi.copy(), budget)
    return Solution(choice, float(loss[rows, choice].sum()), total(choice), bound, lam_hi)


def dual_bound(nbytes: np.ndarray, loss: np.ndarray, budget: int, lam: float) -> float:
    """Lagrangian dual value sum_i min_k(loss + lam*bytes) - lam*budget: a lower bound on the optimum."""
    v = loss + lam * np.asarray(nbytes, dtype=np.float64)
    return float(v.min(axis=1).sum() - lam * budget)


def greedy_fill(nbytes: np.ndarray, loss: np.ndarray, choice: np.ndarray, budget: int,
                max_rounds: int = 64) -> np.ndarray:
    """Spend what is left of the budget: repeatedly apply the upgrades with the best loss decrease per byte.

    Each round computes, for every row, its best-ratio upgrade that fits the remaining bytes, then applies them
    in ratio order while they still fit (one sorted pass, so thousands of tied rows cost one round, not
    thousands). A last pass takes the largest absolute decrease that fits. Never exceeds `budget`.
    """
    n = nbytes.shape[0]
    rows = np.arange(n)
    valid = np.isfinite(loss)
    bf = np.where(valid, nbytes, 0).astype(np.float64)
    for final in (False, True):
        for _ in range(max_rounds):
            left = budget - int(nbytes[rows, choice].sum())
            if left < 0:
                raise AssertionError("greedy_fill entered over budget")
            cb = bf[rows, choice]
            cl = loss[rows, choice]
            db = bf - cb[:, None]
            dl = cl[:, None] - loss
            ok = valid & (dl > 0) & (db <= left)
            if not ok.any():
                break
            if final:
                score = np.where(ok, dl, -np.inf)
            else:
                # free improvements (db <= 0) first, then the best decrease per extra byte
                ratio = np.divide(dl, db, out=np.full_like(dl, np.inf), where=db > 0)
                score = np.where(ok, ratio, -np.inf)
            best = np.argmax(score, axis=1)
            has = ok[rows, best]
            cand = np.flatnonzero(has)
            order = cand[np.argsort(-score[cand, best[cand]], kind="stable")]
            changed = False
            for i in order:
                d = int(nbytes[i, best[i]]) - int(nbytes[i, choice[i]])
                if d <= left:
                    choice[i] = best[i]
                    left -= d
                    changed = True
            if not changed:
                break
    return choice


# ------------------------------------------------------------------------------------------------ groups
def group_items(c: Candidates, groups: Sequence[Sequence[str]] | None) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Merge tensors that must share a type into single items: (members per item, item bytes, item loss)."""
    idx = c.index()
    taken: set[int] = set()
    items: list[list[int]] = []
    for g in groups or []:
        members = [idx[nm] for nm in g if nm in idx and idx[nm] not in taken]
        if len(members) > 1:
            items.append(members)
            taken.update(members)
    items.extend([i] for i in range(c.n) if i not in taken)
    nb = np.zeros((len(items), len(c.types)), dtype=np.int64)
    ls = np.zeros((len(items), len(c.types)))
    for k, members in enumerate(items):
        if len(members) == 1:
            nb[k] = c.nbytes[members[0]]
            ls[k] = c.loss[members[0]]
        else:
            nb[k] = c.nbytes[members].sum(axis=0)
            ls[k] = c.loss[members].sum(axis=0)  # inf if any member cannot take that type
    return items, nb, ls


def allocate(c: Candidates, budget_bytes: int, groups: Sequence[Sequence[str]] | None = None) -> tuple[np.ndarray, Solution]:
    """Choice per tensor (column index) minimising predicted loss with file size <= budget_bytes."""
    room = int(budget_bytes) - int(c.fixed_bytes)
    if room < 0 or c.min_bytes() > budget_bytes:
        raise StrategyError(f"target {budget_bytes} bytes is below the smallest plan this model allows "
                            f"({c.min_bytes()} bytes with the current constraints); raise the target or relax floors")
    if groups:
        items, nb, ls = group_items(c, groups)
        sol = solve_mckp(nb, ls, room)
        choice = np.zeros(c.n, dtype=np.int64)
        for k, members in enumerate(items):
            choice[members] = sol.choice[k]
    else:
        sol = solve_mckp(c.nbytes, c.loss, room)
        choice = sol.choice
    assert c.size_of(choice) <= budget_bytes
    return choice, sol


def budget_from_bpw(c: Candidates, bpw: float) -> int:
    """File-size budget for an average of `bpw` bits per weight over all tensors' data (llama.cpp's BPW)."""
    return int(c.header_bytes + bpw * c.total_params / 8)


def stats_for(c: Candidates, choice: np.ndarray) -> Mapping[str, dict]:
    """Per-tensor evidence for the plan file: bpw, bytes, proxy error and predicted loss at the chosen type."""
    out = {}
    for i, name in enumerate(c.names):
        j = int(choice[i])
        out[name] = {"bytes": int(c.nbytes[i, j]), "bpw": round(float(c.nbytes[i, j]) * 8 / max(1, int(c.n_params[i])), 4),
                     "wmse": float(f"{c.err[i, j]:.6g}"), "loss": float(f"{c.loss[i, j]:.6g}")}
    return out
