"""Budget solver speed: 10,000 tensors x 15 types must solve in <= 1 s.

Prints the solve time, the ratio to the 1 s target, and, as a same-run reference, the time of one plain
vectorised pass over the table (np.argmin over loss + lambda * bytes): the solver costs a few dozen such passes.
Usage: python benchmarks/bench_strategy_solve.py [n_tensors] [n_types]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from strategy.budget import solve_mckp  # noqa: E402


def make_table(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bpw = np.sort(rng.uniform(2.0, 16.0, size=k))
    params = rng.integers(1 << 16, 1 << 24, size=n)
    nbytes = (params[:, None] * bpw[None, :] / 8).astype(np.int64)
    sens = rng.lognormal(0, 1.5, size=n)
    loss = sens[:, None] * params[:, None] * 2.0 ** (-2 * bpw[None, :]) * rng.lognormal(0, 0.3, size=(n, k))
    loss[rng.random((n, k)) < 0.05] = np.inf  # types that do not fit some rows
    loss[:, 0] = np.where(np.isfinite(loss[:, 0]), loss[:, 0], 1e9)
    return nbytes, loss


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    nbytes, loss = make_table(n, k)
    lo = int(nbytes[:, 0].sum())
    hi = int(nbytes.max(axis=1).sum())
    np.argmin(loss + 1e-3 * nbytes, axis=1)  # warm up
    t0 = time.perf_counter()
    for _ in range(10):
        np.argmin(loss + 1e-3 * nbytes, axis=1)
    one_pass = (time.perf_counter() - t0) / 10
    worst = 0.0
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = int(lo + frac * (hi - lo))
        t0 = time.perf_counter()
        sol = solve_mckp(nbytes, loss, budget)
        dt = time.perf_counter() - t0
        worst = max(worst, dt)
        gap = (sol.loss - sol.lower_bound) / max(sol.loss, 1e-300)
        print(f"budget {frac:.0%}: {dt * 1000:7.1f} ms  used {sol.bytes / budget:.6f} of budget  "
              f"loss within {gap:.2e} of the LP bound")
    print(f"{n} tensors x {k} types: worst solve {worst:.3f} s (target 1 s, ratio {worst / 1.0:.2f}); "
          f"one argmin pass {one_pass * 1000:.1f} ms, solve = {worst / max(one_pass, 1e-9):.0f} passes")
    sys.exit(0 if worst <= 1.0 else 1)


if __name__ == "__main__":
    main()
