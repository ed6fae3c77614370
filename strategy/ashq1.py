"""ASHQ1 baseline: the seed's priority-queue allocator, kept to measure our allocators against.

Why keep it: it is the published anchor that uses a *theoretical* error model, so comparing with it shows
what measured (and calibrated) errors buy. The algorithm, as we restate it:

1. Theoretical loss of tensor i at type t: n_params_i * importance_i * depth_w(i) * 2^(-2 * bpw(t)), where
   importance is the tensor's mean imatrix value (1 when unknown) and depth_w is 2.0 for layer 0, 1.5 for the
   last 5 layers and 1.0 elsewhere.
2. Class floors (ASHQ1_FLOORS, plus the user's constraints) give every tensor its starting type: the cheapest
   allowed type at or above its floor.
3. Tied groups: tensors that read the same input (identical imatrix rows: attn_q/k/v, ffn_gate/up of one
   layer) move together, so they always share a type.
4. Max-heap of "upgrade this group to its next type", keyed by loss decrease per MiB; pop the best, apply it
   when it fits the budget, push that group's next upgrade.
5. Free-upgrade pass: switch any group to a type that costs no more bytes and has a lower measured error
   (e.g. Q4_0 -> Q4_K at the same 4.5 bpw), then spend what is left on any upgrade that still fits.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence

import numpy as np

from strategy.problem import Candidates, StrategyError
from strategy.sizes import bits_per_weight

MIB = 1024 * 1024
ASHQ1_FLOORS = {"output": "Q6_K", "token_embd": "Q4_K", "attn_v": "Q4_K", "attn_k": "Q3_K", "ffn_down": "Q3_K"}

_SHARED_INPUT = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("ffn_gate_exps", "ffn_up_exps"),
                 ("ffn_gate_shexp", "ffn_up_shexp"))


def shared_input_groups(names: Sequence[str]) -> list[list[str]]:
    """Tensors of one layer that multiply the same activations (their imatrix rows are identical)."""
    by_layer: dict[tuple[str, int], list[str]] = {}
    for n in names:
        m = re.match(r"^(blk\.\d+\.)(.+)\.weight$", n)
        if not m:
            continue
        for gi, members in enumerate(_SHARED_INPUT):
            if m.group(2) in members:
                by_layer.setdefault((m.group(1), gi), []).append(n)
    return [g for g in by_layer.values() if len(g) > 1]


def depth_weight(layer: int | None, n_layers: int) -> float:
    if layer is None:
        return 1.0
    if layer == 0:
        return 2.0
    if layer >= n_layers - 5:
        return 1.5
    return 1.0


def allocate_ashq1(c: Candidates, budget_bytes: int, importance: Mapping[str, float] | None = None,
                   floors: Mapping[str, str] | None = None,
                   groups: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """Choice per tensor (column index into c.types) with file size <= budget_bytes."""
    floors = dict(ASHQ1_FLOORS if floors is None else floors)
    bpw = np.array([bits_per_weight(t) for t in c.types])
    imp = np.array([float((importance or {}).get(n, 1.0)) for n in c.names])
    dw = np.array([depth_weight(layer, c.n_layers) for layer in c.layers])
    theo = c.n_params[:, None] * (imp * dw)[:, None] * 2.0 ** (-2.0 * bpw)[None, :]
    valid = c.valid.copy()
    # floors only narrow; a floor no type satisfies is ignored for that tensor (the user's constraints are hard)
    for i, cls in enumerate(c.classes):
        f = floors.get(cls)
        if f is not None:
            ok = valid[i] & (bpw >= bits_per_weight(f) - 1e-9)
            if ok.any():
                valid[i] = ok
    groups = shared_input_groups(c.names) if groups is None else groups
    idx = c.index()
    items: list[list[int]] = []
    seen: set[int] = set()
    for g in groups:
        members = [idx[n] for n in g if n in idx and idx[n] not in seen]
        if len(members) > 1 and valid[members].all(axis=0).any():
            items.append(members)
            seen.update(members)
    items += [[i] for i in range(c.n) if i not in seen]
    k = len(c.types)
    ib = np.zeros((len(items), k), dtype=np.int64)
    it = np.zeros((len(items), k))
    ie = np.zeros((len(items), k))
    iv = np.zeros((len(items), k), dtype=bool)
    for j, mem in enumerate(items):
        iv[j] = valid[mem].all(axis=0)
        ib[j] = c.nbytes[mem].sum(axis=0)
        it[j] = theo[mem].sum(axis=0)
        ie[j] = np.nan_to_num(c.loss[mem], posinf=np.inf).sum(axis=0)
    # each item's ladder: valid types by bytes, keeping only those that lower the theoretical loss
    ladders = []
    for j in range(len(items)):
        cols = np.flatnonzero(iv[j])
        cols = cols[np.lexsort((it[j, cols], ib[j, cols]))]
        lad = []
        for col in cols:
            if not lad or (ib[j, col] > ib[j, lad[-1]] and it[j, col] < it[j, lad[-1]]):
                lad.append(int(col))
        ladders.append(lad)
    pos = [0] * len(items)
    used = int(c.fixed_bytes) + sum(int(ib[j, ladders[j][0]]) for j in range(len(items)))
    if used > budget_bytes:
        raise StrategyError(f"target {budget_bytes} bytes is below ASHQ1's floors ({used} bytes)")
    heap: list[tuple[float, int, int]] = []

    def push(j: int) -> None:
        p = pos[j]
        if p + 1 < len(ladders[j]):
            a, b = ladders[j][p], ladders[j][p + 1]
            util = (it[j, a] - it[j, b]) / ((ib[j, b] - ib[j, a]) / MIB)
            heapq.heappush(heap, (-util, j, p))

    for j in range(len(items)):
        push(j)
    while heap:
        _, j, p = heapq.heappop(heap)
        if p != pos[j]:
            continue
        a, b = ladders[j][p], ladders[j][p + 1]
        extra = int(ib[j, b] - ib[j, a])
        if used + extra <= budget_bytes:
            used += extra
            pos[j] = p + 1
            push(j)
    chosen = [ladders[j][pos[j]] for j in range(len(items))]
    # free upgrades: same or fewer bytes, lower measured error (loss); then any upgrade that still fits
    for j in range(len(items)):
        cur = chosen[j]
        cand = np.flatnonzero(iv[j] & (ib[j] <= ib[j, cur]) & (ie[j] < ie[j, cur]))
        if len(cand):
            new = int(cand[np.argmin(ie[j, cand])])
            used += int(ib[j, new] - ib[j, cur])
            chosen[j] = new
    order = sorted(range(len(items)), key=lambda j: -(it[j, chosen[j]]))
    for j in order:
        cur = chosen[j]
        cand = np.flatnonzero(iv[j] & (ib[j] > ib[j, cur]) & (ib[j] - ib[j, cur] <= budget_bytes - used)
                              & (it[j] < it[j, cur]))
        if len(cand):
            new = int(cand[np.argmin(it[j, cand])])
            used += int(ib[j, new] - ib[j, cur])
            chosen[j] = new
    choice = np.zeros(c.n, dtype=np.int64)
    for j, mem in enumerate(items):
        choice[mem] = chosen[j]
    assert c.size_of(choice) <= budget_bytes
    return choice
