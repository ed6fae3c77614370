"""Residual-stream channel order: which hidden channels share a 32-block, chosen from calibration statistics.

Permuting the hidden channels of a llama-style model (the embedding's columns, every norm weight, the columns
of q/k/v/gate/up and the head, the rows of o_proj/down_proj) is exact: RMSNorm and the elementwise norm weights
commute with a permutation, so the function is unchanged even when the head is tied to the embedding (where
smoothing cannot reach the head; `measure.smooth`). What changes is which channels meet in one 32-value block:

- llama.cpp rounds the head's input to 8 bits per 32-block (Q8_0 activations). A block holding one of the final
  norm's large channels (20x the median on SmolLM2) rounds its other 31 channels coarsely. On SmolLM2 this
  rounding alone costs 0.0010 mean KLD, a third of a Q6_K-size file's loss.
- A 32-block type of the embedding (Q5_1, Q8_0...) shares one scale per block of a row, so a block that mixes
  large and small columns quantizes the small ones coarsely.

The order minimises a model of both costs (a block's cost is its largest value squared, the scale, times the
sensitivity of its channels; `order_cost`), by random pair swaps from the checkpoint's own order, accepted only
when the modelled cost falls. On SmolLM2 it predicts the measured head-rounding KLD within 10%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1          # bump when the chosen order changes (caches of reordered checkpoints are keyed by it)
BLOCK = 32          # Q8_0 activations and every 32-block weight type
Q8_STEP = 127.0     # Q8_0: scale = max|x| / 127
Q5_1_STEP = 31.0    # the weight term models Q5_1 (affine, 5 bits): the coarsest 32-block type a plan gives the head


class PermuteError(ValueError):
    """Unusable model or text for the statistics; one line naming the file and the fix."""


@dataclass
class HeadStats:
    """What the order is chosen from: per calibration token the head's input, per channel how much noise on it
    moves the predicted distribution, per vocabulary row how likely it is predicted, and the head's weight."""

    inputs_sq: np.ndarray     # (tokens, K) squared final-norm outputs
    sensitivity: np.ndarray   # (K,) mean over tokens of Var_p(head[:, j]): logit noise per unit input noise
    row_weight: np.ndarray    # (V,) mean predicted probability of each row
    head: np.ndarray          # (V, K) float32


def collect_head_stats(model_dir: str | Path, text: str | Path, *, ctx: int = 512, chunks: int = 6,
                       device: str | None = None) -> HeadStats:
    """One forward pass over `chunks` x `ctx` tokens of `text` (torch, transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, text = Path(model_dir), Path(text)
    if chunks < 1 or ctx < 1:
        raise PermuteError(f"--order-chunks {chunks} / --order-ctx {ctx}: both must be at least 1")
    try:
        words = text.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PermuteError(f"{text}: cannot read the calibration text ({e.strerror})") from None
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(words, add_special_tokens=False)["input_ids"]
    n = min(chunks, len(ids) // ctx)
    if n < 1:
        raise PermuteError(f"{text}: {len(ids)} tokens, fewer than one chunk of {ctx}; pass a longer text")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev).eval()
    norm = model.get_decoder().norm
    head = model.get_output_embeddings().weight.detach()
    head_sq = head * head  # once: Var_p(head column) needs E_p[head^2] for every batch of tokens
    seen: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    k = head.shape[1]
    sens = torch.zeros(k, dtype=torch.float64, device=dev)
    rows = torch.zeros(head.shape[0], dtype=torch.float64, device=dev)
    sq, count = [], 0
    try:
        with torch.inference_mode():
            for c in range(n):
                seen.clear()
                model.model(input_ids=torch.tensor([ids[c * ctx:(c + 1) * ctx]], device=dev))
                h = seen[-1].reshape(-1, k).float()
                sq.append((h * h).cpu().numpy())
                for t0 in range(0, h.shape[0], 128):
                    p = torch.softmax(h[t0:t0 + 128] @ head.T, dim=-1)
                    m1, m2 = p @ head, p @ head_sq
                    sens += (m2 - m1 * m1).double().sum(0)
                    rows += p.double().sum(0)
                count += h.shape[0]
    finally:
        hook.remove()
    return HeadStats(np.concatenate(sq), (sens / count).cpu().numpy(), (rows / count).cpu().numpy(),
                     head.float().cpu().numpy())


class _Model:
    """The cost model, per block of channels (see the module docstring); the total is the sum over blocks."""

    def __init__(self, stats: HeadStats, top_rows: int, tokens: int, seed: int):
        rng = np.random.default_rng(seed)
        sq = stats.inputs_sq
        if sq.shape[0] > tokens:
            sq = sq[np.sort(rng.choice(sq.shape[0], tokens, replace=False))]
        self.sq = sq.astype(np.float64)
        self.sens = stats.sensitivity.astype(np.float64)
        top = np.argsort(-stats.row_weight)[:top_rows]
        self.rw = stats.row_weight[top].astype(np.float64)
        self.rows = stats.head[top].astype(np.float64)
        self.input_ms = stats.inputs_sq.mean(axis=0).astype(np.float64)

    def block(self, ch: np.ndarray) -> float:
        # activation rounding: noise variance (max/127)^2/12 per channel, times how much it moves the logits
        act = self.sq[:, ch].max(axis=1).mean() * self.sens[ch].sum() / (Q8_STEP ** 2 * 12)
        # weight blocks: (range/31)^2/12 per weight, times the input's mean square, per row by its probability
        w = self.rows[:, ch]
        span = w.max(axis=1) - w.min(axis=1)
        wt = (self.rw * span * span).sum() * self.input_ms[ch].sum() / (Q5_1_STEP ** 2 * 12)
        return 0.5 * (act + wt)


def order_cost(stats: HeadStats, order: np.ndarray, *, top_rows: int = 4096, tokens: int = 2048,
               seed: int = 0) -> float:
    """The modelled KLD of an order (about the head's share: activation rounding plus a Q5_1 head)."""
    m = _Model(stats, top_rows, tokens, seed)
    order = np.asarray(order)
    return float(sum(m.block(order[b:b + BLOCK]) for b in range(0, order.size, BLOCK)))


def choose_order(stats: HeadStats, *, swaps_per_channel: int = 50, top_rows: int = 4096, tokens: int = 2048,
                 seed: int = 0) -> np.ndarray:
    """A permutation of the K channels (new position -> old channel) with a lower modelled cost than the
    identity, or the identity. Deterministic for a seed."""
    k = stats.sensitivity.size
    if k % BLOCK:
        raise PermuteError(f"hidden size {k} is not a multiple of {BLOCK}; no 32-block type applies, nothing to order")
    m = _Model(stats, top_rows, tokens, seed)
    rng = np.random.default_rng(seed)
    order = np.arange(k)
    where = np.arange(k)  # channel -> position
    costs = np.array([m.block(order[b:b + BLOCK]) for b in range(0, k, BLOCK)])
    by_size = np.argsort(-m.input_ms)  # proposals favour the large channels, which set the block scales
    for _ in range(swaps_per_channel * k):
        a = by_size[min(int(rng.exponential(k / 16)), k - 1)] if rng.random() < 0.7 else int(rng.integers(k))
        ia, ic = int(where[a]), int(rng.integers(k))
        ba, bc = ia // BLOCK, ic // BLOCK
        if ba == bc:
            continue
        order[ia], order[ic] = order[ic], order[ia]
        ca = m.block(order[ba * BLOCK:(ba + 1) * BLOCK])
        cc = m.block(order[bc * BLOCK:(bc + 1) * BLOCK])
        if ca + cc < costs[ba] + costs[bc]:
            costs[ba], costs[bc] = ca, cc
            where[order[ia]], where[order[ic]] = ia, ic
        else:
            order[ia], order[ic] = order[ic], order[ia]
    return order
