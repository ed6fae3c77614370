"""Polishing a compensated encoding: codes and block scales refined for the output error the walk left.

GPTQ (`quants.compensate`) decides each weight once, greedily, left to right, and keeps the scales ggml chose
for the nudged block. Neither choice is optimal for the loss it targets, trace(E H E^T). Two cheap passes
lower it further, in the same bytes:

- coordinate descent on the codes: each weight in turn may move one level up or down on its block's grid when
  that lowers the row's loss (the change is -2 d g_j + d^2 H_jj for a step d, g = E H kept up to date), a few
  sweeps until no weight moves;
- for the 32-blocks whose header is an fp16 scale (and minimum) (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), with the
  codes fixed the loss is quadratic in the block scales: one small least-squares system per row (2 x 18 unknowns
  for a 576-wide Q5_1 row) gives them, rounded to fp16; then the codes descend again. A row keeps the new
  scales only if its loss fell.

Both use H damped by `DAMP` x mean(diag H), more than GPTQ's factor: on SmolLM2 the loss under a covariance of
other text fell most at 0.05 (docs/compensation.md). K-quant scales are 6-bit integers under an fp16 super-scale
and are left as the walk wrote them; their codes still descend. The result is decoded by ggml unchanged.
"""

from __future__ import annotations

import numpy as np

import quants
from quants import levels

SWEEPS = 10     # at most this many passes over a row's weights; a row stops when no weight moved
ROUNDS = 3      # scale refits, each followed by descent
DAMP = 0.05     # fraction of mean(diag H) added to the diagonal of the polishing loss
# types whose block starts with an fp16 scale d (bytes 0-1) and, when True, an fp16 minimum m (bytes 2-3);
# a weight decodes as d * table[code] (+ m)
REFIT_TYPES: dict[str, bool] = {"Q4_0": False, "Q4_1": True, "Q5_0": False, "Q5_1": True, "Q8_0": False,
                                "IQ4_NL": False}


def damped(hessian: np.ndarray, damp: float) -> np.ndarray:
    """H (float64 copy) with columns never activated decoupled (unit diagonal) and damp x mean(live diag) added."""
    h = np.array(hessian, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    live_mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    h[np.diag_indices(h.shape[0])] += damp * live_mean
    return h


def polish(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray, *, sweeps: int = SWEEPS,
           rounds: int = ROUNDS) -> np.ndarray:
    """Bytes `out` (rows, row bytes) of the weights `w` (rows, K) with a lower loss under `h` (already damped):
    same type and layout, every row's loss no higher than before."""
    qtype = quants.parse_type(qtype)
    w = np.asarray(w, dtype=np.float64)
    out = descend(w, out, qtype, h, sweeps)
    if qtype.name not in REFIT_TYPES or rounds <= 0:
        return out
    loss = row_loss(w, out, qtype, h)
    for _ in range(rounds):
        cand = descend(w, refit(w, out, qtype, h), qtype, h, sweeps)
        cand_loss = row_loss(w, cand, qtype, h)
        better = cand_loss < loss
        if not better.any():
            break
        out = np.where(better[:, None], cand, out)
        loss = np.where(better, cand_loss, loss)
    return out


def row_loss(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray) -> np.ndarray:
    """Per row e H e^T, e = w - what ggml decodes from `out`."""
    e = w - quants.dequantize(out, qtype).reshape(w.shape).astype(np.float64)
    return np.einsum("ij,ij->i", e @ h, e)


def _blocks(out: np.ndarray, qtype) -> tuple[np.ndarray, int]:
    lay = levels.layout(qtype)
    return out.reshape(-1, lay.nbytes), lay.block


def descend(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray, sweeps: int = SWEEPS) -> np.ndarray:
    """Coordinate descent on the codes, the blocks' grids fixed."""
    lay = levels.layout(quants.parse_type(qtype))
    n, k = w.shape
    blocks, bs = _blocks(out, lay.qtype)
    scale, offset = levels.grid(blocks, lay.qtype)
    scale, offset = scale.reshape(n, k), offset.reshape(n, k)
    rank = np.zeros(len(lay.table), dtype=np.int64)
    rank[lay.allowed] = np.arange(len(lay.allowed))
    values = lay.table[lay.allowed]
    pos = rank[levels.unpack_codes(blocks, lay.qtype)].reshape(n, k)
    g = (w - (scale * values[pos] - offset)) @ h
    (_descend_compiled if USE_NUMBA else _descend_rows)(pos, scale, values, g, np.ascontiguousarray(h), sweeps)
    codes = lay.allowed[pos].reshape(-1, bs)
    return levels.pack_codes(blocks, codes, lay.qtype).reshape(out.shape)


def _descend_rows(pos, scale, values, g, h, sweeps) -> None:
    """The descent, vectorised over rows (the numpy reference of the compiled kernel below). `pos` (each
    weight's rank among the allowed levels) and `g` (E H) are updated in place."""
    top = len(values) - 1
    active = np.ones(pos.shape[0], dtype=bool)
    for _ in range(sweeps):
        moved_any = np.zeros(pos.shape[0], dtype=bool)
        for j in range(pos.shape[1]):
            p = pos[:, j]
            s = scale[:, j]
            up = np.where(p < top, values[np.minimum(p + 1, top)] - values[p], 0.0) * s
            dn = np.where(p > 0, values[np.maximum(p - 1, 0)] - values[p], 0.0) * s
            hjj = h[j, j]
            gain_up = -2.0 * up * g[:, j] + up * up * hjj
            gain_dn = -2.0 * dn * g[:, j] + dn * dn * hjj
            go_up = (gain_up < -1e-12 * hjj) & (p < top) & (gain_up <= gain_dn)
            go_dn = (gain_dn < -1e-12 * hjj) & (p > 0) & ~go_up
            move = (go_up | go_dn) & active
            if not move.any():
                continue
            d = np.where(go_up, up, dn)[move]
            pos[move, j] += np.where(go_up[move], 1, -1)
            g[move] -= d[:, None] * h[j][None, :]
            moved_any |= move
        active &= moved_any
        if not active.any():
            break


def _descend_kernel(pos, scale, values, g, h, sweeps):  # pragma: no cover - compiled
    n, k = pos.shape
    top = len(values) - 1
    for r in range(n):
        for _ in range(sweeps):
            moved = False
            for j in range(k):
                p = pos[r, j]
                s = scale[r, j]
                hjj = h[j, j]
                gj = g[r, j]
                gain_up = 1.0
                gain_dn = 1.0
                up = 0.0
                dn = 0.0
                if p < top:
                    up = (values[p + 1] - values[p]) * s
                    gain_up = -2.0 * up * gj + up * up * hjj
                if p > 0:
                    dn = (values[p - 1] - values[p]) * s
                    gain_dn = -2.0 * dn * gj + dn * dn * hjj
                go_up = p < top and gain_up < -1e-12 * hjj and gain_up <= gain_dn
                go_dn = (not go_up) and p > 0 and gain_dn < -1e-12 * hjj
                if go_up or go_dn:
                    d = up if go_up else dn
                    pos[r, j] = p + 1 if go_up else p - 1
                    for i in range(k):
                        g[r, i] -= d * h[j, i]
                    moved = True
            if not moved:
                break


def refit(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Codes fixed, each block's fp16 scale (and minimum) set to the least-squares optimum of the row's loss."""
    qtype = quants.parse_type(qtype)
    affine = REFIT_TYPES[qtype.name]
    lay = levels.layout(qtype)
    n, k = w.shape
    blocks, bs = _blocks(out, qtype)
    blocks = blocks.copy()
    nblk = k // bs
    level = lay.table[levels.unpack_codes(blocks, qtype)].reshape(n, nblk, bs)
    scale, offset = levels.grid(blocks, qtype)
    x0 = scale[:, 0].reshape(n, nblk)
    if affine:
        x0 = np.concatenate([x0, offset[:, 0].reshape(n, nblk)], axis=1)
    h_blk = h.reshape(k, nblk, bs).sum(axis=2)            # H S: S sums a block's columns
    s_h_s = h_blk.reshape(nblk, bs, nblk).sum(axis=1)     # S^T H S
    x = np.empty_like(x0)
    for r0 in range(0, n, chunk):
        c = level[r0:r0 + chunk]
        m = c.shape[0]
        hc = np.empty((m, k, nblk))  # H diag(c) S, per row
        for b in range(nblk):
            hc[:, :, b] = c[:, b] @ h[b * bs:(b + 1) * bs, :]
        a_dd = np.einsum("mai,maib->mab", c, hc.reshape(m, nblk, bs, nblk))
        hw = (w[r0:r0 + chunk] @ h).reshape(m, nblk, bs)
        rhs = np.einsum("mai,mai->ma", c, hw)
        if affine:  # a weight decodes as d * c - o (o = -m): unknowns (d, o)
            a_do = -np.einsum("mai,aib->mab", c, h_blk.reshape(nblk, bs, nblk))
            a = np.empty((m, 2 * nblk, 2 * nblk))
            a[:, :nblk, :nblk] = a_dd
            a[:, :nblk, nblk:] = a_do
            a[:, nblk:, :nblk] = a_do.transpose(0, 2, 1)
            a[:, nblk:, nblk:] = s_h_s
            rhs = np.concatenate([rhs, -hw.sum(axis=2)], axis=1)
        else:
            a = a_dd
        # solve for the step from today's scales, lightly regularised: a block of equal codes has no unique (d, o)
        start = x0[r0:r0 + chunk]
        ridge = 1e-6 * np.einsum("mii->m", a) / a.shape[1] + 1e-300
        step = np.linalg.solve(a + ridge[:, None, None] * np.eye(a.shape[1]),
                               (rhs - np.einsum("mpq,mq->mp", a, start))[..., None])[..., 0]
        x[r0:r0 + chunk] = start + step
    if not np.isfinite(x).all():
        x = np.where(np.isfinite(x), x, x0)
    fp16 = np.finfo(np.float16).max
    d = np.clip(x[:, :nblk], -fp16, fp16).reshape(-1).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    if affine:
        mins = np.clip(-x[:, nblk:], -fp16, fp16).reshape(-1).astype(np.float16)
        blocks[:, 2:4] = mins.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(out.shape)


def _self_check(kernel) -> bool:
    """The compiled descent moves the same codes as the numpy one on a small correlated case, or is not used."""
    if kernel is None:
        return False
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 64))
    m = rng.standard_normal((64, 64))
    h = m @ m.T / 64 + 0.1 * np.eye(64)
    lay = levels.layout(quants.parse_type("Q4_1"))
    blocks = quants.quantize(x.astype(np.float32), "Q4_1").reshape(-1, lay.nbytes)
    scale, offset = levels.grid(blocks, lay.qtype)
    rank = np.zeros(len(lay.table), dtype=np.int64)
    rank[lay.allowed] = np.arange(len(lay.allowed))
    values = lay.table[lay.allowed]
    pos0 = rank[levels.unpack_codes(blocks, lay.qtype)].reshape(6, 64)
    scale, offset = scale.reshape(6, 64), offset.reshape(6, 64)
    results = []
    for fn in (_descend_rows, kernel):
        pos = pos0.copy()
        g = (x - (scale * values[pos] - offset)) @ h
        try:
            fn(pos, scale, values, g, h, 5)
        except Exception:  # pragma: no cover
            return False
        results.append(pos)
    return bool(np.array_equal(results[0], results[1]) and not np.array_equal(results[0], pos0))


_descend_compiled = quants.compiled_kernel(_descend_kernel)
USE_NUMBA = _self_check(_descend_compiled)
