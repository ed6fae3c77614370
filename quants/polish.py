"""Polishing a compensated encoding: codes and block scales refined for the output error the walk left.

GPTQ (`quants.compensate`) decides each weight once, greedily, left to right, and keeps the scales ggml chose
for the nudged block. Neither choice is optimal for the loss it targets, trace(E H E^T). Cheap passes lower it
further, in the same bytes:

- coordinate descent on the codes: each weight in turn may move one level up or down on its block's grid when
  that lowers the row's loss (the change is -2 d g_j + d^2 H_jj for a step d, g = E H kept up to date), a few
  sweeps until no weight moves;
- for the 32-blocks whose header is an fp16 scale (and minimum) (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), with the
  codes fixed the loss is quadratic in the block scales: one small least-squares system per row (2 x 18 unknowns
  for a 576-wide Q5_1 row) gives them, rounded to fp16; then the codes descend again;
- for Q4_K, Q5_K and Q6_K, whose sub-block scales (and mins) are 6- or 8-bit integers under fp16 super-scales,
  two candidates per round: coordinate descent on those integers (one step of a scale, a min, or both, moves a
  whole sub-block), and the same descent after a refit (sub-block scales solved as reals, rounded onto the
  integer grid under a new super-scale, then the super-scales solved again with the integers fixed).
  On SmolLM2's ffn_down this lowers the in-sample loss by 2-3% (Q4_K, Q6_K) and 0.4% (Q5_K) beyond the codes.

A row keeps a candidate only if its loss fell. Both use H damped by `DAMP` x mean(diag H), more than GPTQ's
factor: on SmolLM2 the loss under a covariance of other text fell most at 0.05 (docs/compensation.md). Q2_K,
Q3_K and IQ4_XS keep the walk's scales; their codes still descend. The result is decoded by ggml unchanged.
"""

from __future__ import annotations

import numpy as np

import quants
from quants import levels
from quants.affine_search import fp16_bytes, pack_k4_scales, unpack_k4_scales

SWEEPS = 10     # at most this many passes over a row's weights; a row stops when no weight moved
ROUNDS = 3      # scale refits, each followed by descent
DAMP = 0.05     # fraction of mean(diag H) added to the diagonal of the polishing loss
# types whose block starts with an fp16 scale d (bytes 0-1) and, when True, an fp16 minimum m (bytes 2-3);
# a weight decodes as d * table[code] (+ m)
REFIT_TYPES: dict[str, bool] = {"Q4_0": False, "Q4_1": True, "Q5_0": False, "Q5_1": True, "Q8_0": False,
                                "IQ4_NL": False}
# K-quants whose sub-block scales are refitted: (sub-block length, largest integer scale, with mins)
K_REFIT: dict[str, tuple[int, int, bool]] = {"Q6_K": (16, 127, False), "Q5_K": (32, 63, True), "Q4_K": (32, 63, True)}


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
    moves = scale_moves(qtype, sweeps)
    if not moves or rounds <= 0:
        return out
    loss = row_loss(w, out, qtype, h)
    for _ in range(rounds):
        improved = False
        for move in moves:  # each candidate's codes descend on its new grid; a row takes it only if its loss fell
            cand = descend(w, move(w, out, qtype, h), qtype, h, sweeps)
            cand_loss = row_loss(w, cand, qtype, h)
            better = cand_loss < loss
            if better.any():
                improved = True
                out = np.where(better[:, None], cand, out)
                loss = np.where(better, cand_loss, loss)
        if not improved:
            break
    return out


def scale_moves(qtype, sweeps: int = SWEEPS) -> list:
    """The scale refinements tried each round, per type (none for Q2_K, Q3_K and IQ4_XS)."""
    name = quants.parse_type(qtype).name
    if name in REFIT_TYPES:
        return [refit]
    if name in K_REFIT:
        return [lambda w, out, qt, h: descend_k_scales(w, out, qt, h, sweeps),
                lambda w, out, qt, h: descend_k_scales(w, refit_k(w, out, qt, h), qt, h, sweeps)]
    return []


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


def refit(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray) -> np.ndarray:
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
    x = _block_lstsq(w, h, level, np.ones_like(level) if affine else None, x0)
    blocks[:, 0:2] = _fp16_bytes(x[:, :nblk])
    if affine:
        blocks[:, 2:4] = _fp16_bytes(-x[:, nblk:])
    return blocks.reshape(out.shape)


def refit_k(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray) -> np.ndarray:
    """K-quant scales for fixed codes: the sub-blocks' scales (and mins) solved as free reals, rounded onto the
    type's integer grid under a fresh super-scale (max / top), then the fp16 super-scales (d, dmin) solved again
    with those integers fixed. Q6_K: int8 scales of 16-weight sub-blocks; Q4_K/Q5_K: 6-bit scales and mins of
    32-weight sub-blocks."""
    qtype, blocks, level, (n, k, nsb, per, sub, top, affine) = _k_blocks(w, out, qtype)
    bs = per * sub                                         # super-block length
    scale, offset = levels.grid(blocks, qtype)
    x0 = scale.reshape(n, k)[:, ::sub]
    if affine:
        x0 = np.concatenate([x0, offset.reshape(n, k)[:, ::sub]], axis=1)
    x = _block_lstsq(w, h, level, np.ones_like(level) if affine else None, x0)
    s = x[:, :nsb * per].reshape(n * nsb, per)
    if affine:  # ggml's grid: d * sc * q - dmin * m with sc, m in 0..63
        s = np.maximum(s, 0.0)
        o = np.maximum(x[:, nsb * per:].reshape(n * nsb, per), 0.0)
        d, sc = _integer_scales(s, top, 0)
        dmin, m = _integer_scales(o, top, 0)
    else:       # d * sc * (q - 32) with sc in -128..127, as ggml's Q6_K
        d, sc = _integer_scales(s, 127, -128)
    coef_s = (sc.reshape(n, nsb, per, 1) * level.reshape(n, nsb, per, sub)).reshape(n, nsb, bs)
    coef_o = np.repeat(m, sub, axis=1).reshape(n, nsb, bs).astype(np.float64) if affine else None
    y0 = d.reshape(n, nsb) if not affine else np.concatenate([d.reshape(n, nsb), dmin.reshape(n, nsb)], axis=1)
    y = _block_lstsq(w, h, coef_s, coef_o, y0)
    if affine:
        _set_k_header(blocks, qtype, y[:, :nsb], sc, y[:, nsb:], m)
    else:
        _set_k_header(blocks, qtype, y[:, :nsb], sc)
    return blocks.reshape(out.shape)


def descend_k_scales(w: np.ndarray, out: np.ndarray, qtype, h: np.ndarray, sweeps: int = SWEEPS) -> np.ndarray:
    """Coordinate descent on a K-quant's integer sub-block scales (and mins), codes and super-scales fixed: each
    moves by one step when that lowers the row's loss (a step moves its whole sub-block's weights at once)."""
    qtype, blocks, level, (n, k, nsb, per, sub, top, affine) = _k_blocks(w, out, qtype)
    d, dmin, sc, m = _k_header(blocks, qtype)
    d_w = np.repeat(d.reshape(n, nsb), per, axis=1)                 # (n, sub-blocks): each sub-block's d
    dmin_w = np.repeat(dmin.reshape(n, nsb), per, axis=1)
    sc = sc.reshape(n, nsb * per).astype(np.int64)
    m = m.reshape(n, nsb * per).astype(np.int64)
    g = (w - quants.dequantize(out, qtype).reshape(n, k).astype(np.float64)) @ h
    # moves (scale step, min step): alone, and for mins also together, so a scale step can keep the block's mean
    moves = [(1, 0), (-1, 0)] + ([(0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)] if affine else [])
    lo_s = 0 if affine else -128
    # a row that moved nothing in a whole sweep is done (its g changes only when it moves), so each sweep visits
    # the rows still moving; the quadratic forms of a step are the same for every move, so they are formed once
    rows = np.arange(n)
    for _ in range(sweeps):
        moved = np.zeros(len(rows), dtype=bool)
        for j in range(nsb * per):
            cols = slice(j * sub, (j + 1) * sub)
            hjj = h[cols, cols]
            u_s = d_w[rows, j, None] * level[rows, j]                 # (rows, sub): w^ change per scale step
            c_m = -dmin_w[rows, j]                                   # ... per min step, the same for the sub-block
            gj = g[rows, cols]
            a = u_s @ hjj
            q_ss = np.einsum("ni,ni->n", a, u_s)
            q_sm = c_m * a.sum(axis=1)
            q_mm = c_m * c_m * hjj.sum()
            l_s = np.einsum("ni,ni->n", u_s, gj)
            l_m = c_m * gj.sum(axis=1)
            best = np.zeros(len(rows))
            best_ts = np.zeros(len(rows), dtype=np.int64)
            best_tm = np.zeros(len(rows), dtype=np.int64)
            s_j, m_j = sc[rows, j], m[rows, j]
            for ts, tm in moves:
                quad = ts * ts * q_ss + 2 * ts * tm * q_sm + tm * tm * q_mm
                gain = -2.0 * (ts * l_s + tm * l_m) + quad
                ok = ((s_j + ts >= lo_s) & (s_j + ts <= top) & (m_j + tm >= 0) & (m_j + tm <= top)
                      & (gain < best) & (gain < -1e-12 * quad))
                best = np.where(ok, gain, best)
                best_ts = np.where(ok, ts, best_ts)
                best_tm = np.where(ok, tm, best_tm)
            go = np.flatnonzero((best_ts != 0) | (best_tm != 0))
            if not go.size:
                continue
            moved[go] = True
            r = rows[go]
            sc[r, j] += best_ts[go]
            m[r, j] += best_tm[go]
            g[r] -= (best_ts[go, None] * u_s[go] + (best_tm[go] * c_m[go])[:, None]) @ h[cols, :]
        rows = rows[moved]
        if not rows.size:
            break
    _set_k_header(blocks, qtype, d, sc.reshape(n * nsb, per), dmin, m.reshape(n * nsb, per))
    return blocks.reshape(out.shape)


def _k_blocks(w: np.ndarray, out: np.ndarray, qtype) -> tuple:
    """A K-quant row set's blocks (a copy to edit), code levels (rows, sub-blocks, sub) and its shape facts
    (rows, K, super-blocks per row, sub-blocks per super-block, sub-block length, largest scale, with mins)."""
    qtype = quants.parse_type(qtype)
    sub, top, affine = K_REFIT[qtype.name]
    lay = levels.layout(qtype)
    n, k = w.shape
    blocks, bs = _blocks(out, qtype)
    blocks = blocks.copy()
    nsb, per = k // bs, bs // sub
    level = lay.table[levels.unpack_codes(blocks, qtype)].reshape(n, nsb * per, sub)
    return qtype, blocks, level, (n, k, nsb, per, sub, top, affine)


def _k_header(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin, sub-block scales, mins) of K-quant blocks, as stored (float16 values as float64)."""
    if qtype.name == "Q6_K":
        sc = blocks[:, 192:208].view(np.int8).astype(np.int64)
        d = blocks[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float64)
        return d, np.zeros_like(d), sc, np.zeros_like(sc)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float64)
    sc, m = unpack_k4_scales(blocks[:, 4:16])
    return d, dmin, sc.T.astype(np.int64), m.T.astype(np.int64)


def _set_k_header(blocks: np.ndarray, qtype, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None = None,
                  m: np.ndarray | None = None) -> None:
    """Writes _k_header's fields back (Q6_K has no mins)."""
    if qtype.name == "Q6_K":
        blocks[:, 192:208] = sc.astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = _fp16_bytes(d)
        return
    blocks[:, 0:2] = _fp16_bytes(d)
    blocks[:, 2:4] = _fp16_bytes(dmin)
    blocks[:, 4:16] = pack_k4_scales(sc.T.astype(np.uint8), m.T.astype(np.uint8))


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """Reals -> fp16 byte pairs, clipped to fp16's range (a solve's outlier must not become inf)."""
    fp16 = float(np.finfo(np.float16).max)
    return fp16_bytes(np.clip(np.ravel(v), -fp16, fp16))


def _integer_scales(s: np.ndarray, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray]:
    """Reals (blocks, per) -> (super-scale (blocks,), integers in [bottom, top]) with d * ints ~ s; an all-zero
    block keeps d = 0."""
    amax = np.abs(s).max(axis=1)
    d = amax / top
    ints = np.clip(np.rint(s / np.where(d > 0, d, 1.0)[:, None]), bottom, top)
    return d, ints


def _block_lstsq(w: np.ndarray, h: np.ndarray, coef_s: np.ndarray, coef_o: np.ndarray | None,
                 x0: np.ndarray) -> np.ndarray:
    """Per row, the reals x minimising (w - w^) H (w - w^)^T where block b of the row decodes as
    x_b * coef_s[b] - x_o,b * coef_o[b] (coef_* (rows, blocks, block length)); returns (rows, blocks [x2])."""
    n, k = w.shape
    nblk, bs = coef_s.shape[1:]
    hb = h.reshape(nblk, bs, k)
    x = np.empty_like(x0)
    # rows per pass: the (rows, k, blocks) products stay at 16 MiB, under glibc's largest mmap threshold, so
    # their memory is reused from pass to pass instead of being mapped (and page-faulted) afresh every time
    chunk = max(1, min(n, (1 << 21) // (k * nblk)))
    for r0 in range(0, n, chunk):
        c = coef_s[r0:r0 + chunk]
        m = c.shape[0]
        hc = np.matmul(c.transpose(1, 0, 2), hb).reshape(nblk, m, nblk, bs)  # (A_s^T H)[a] per row, batched BLAS
        a_ss = np.einsum("ambi,mbi->mab", hc, c)
        hw = (w[r0:r0 + chunk] @ h).reshape(m, nblk, bs)
        rhs = np.einsum("mai,mai->ma", c, hw)
        if coef_o is not None:
            u = coef_o[r0:r0 + chunk]
            hu = np.matmul(u.transpose(1, 0, 2), hb).reshape(nblk, m, nblk, bs)
            a_so = -np.einsum("bmai,mai->mab", hu, c)
            a_oo = np.einsum("ambi,mbi->mab", hu, u)
            a = np.empty((m, 2 * nblk, 2 * nblk))
            a[:, :nblk, :nblk] = a_ss
            a[:, :nblk, nblk:] = a_so
            a[:, nblk:, :nblk] = a_so.transpose(0, 2, 1)
            a[:, nblk:, nblk:] = a_oo
            rhs = np.concatenate([rhs, -np.einsum("mai,mai->ma", u, hw)], axis=1)
        else:
            a = a_ss
        # solve for the step from today's scales, lightly regularised: a block of equal codes has no unique (d, o)
        start = x0[r0:r0 + chunk]
        ridge = 1e-6 * np.einsum("mii->m", a) / a.shape[1] + 1e-300
        step = np.linalg.solve(a + ridge[:, None, None] * np.eye(a.shape[1]),
                               (rhs - np.einsum("mpq,mq->mp", a, start))[..., None])[..., 0]
        x[r0:r0 + chunk] = start + step
    return np.where(np.isfinite(x), x, x0)


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
