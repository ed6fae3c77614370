"""Per-row statistics of a tied token embedding: what lets each of its most important rows be encoded under an
input covariance of its own (`quants.compensate.RowCovariances`).

Why: a tied embedding is both the lookup table and the output head, and on SmolLM2 it carries about 40% of a
mixed plan's KLD (docs/quality.md). One shared covariance, the head's input sum_t h_t h_t^T, treats every row
alike. But KL's curvature in logit v is p_v (1 - p_v), so row v's head error matters only where v is probable,
and its lookup error only where v occurs, weighted by the loss's Fisher G w.r.t. the input embedding. Row v's
own objective is

    H_v = sum_t p_v(t) (1 - p_v(t)) h_t h_t^T  +  LOOKUP_WEIGHT * count_v * G  +  SHRINK * mean_t h_t h_t^T

(the last term shrinks a row with little evidence towards the shared shape). Measured on SmolLM2 at Q5_1, 5,000
rows: the tied model's KL with every other weight exact fell 9% / 7% on held-out Moby-Dick / licences
(`benchmarks/embedding_rows.py`). Collected by `python -m measure imatrix --hessian F --embedding-rows N` and
stored in the covariance file F beside the shared matrices (`measure.hessian`).

Cost: per position, the hidden state (D floats) and its TOPK most curved tokens; one backward pass per chunk for
G; at encoding time about (positions x TOPK) x D^2 flops to build the chosen rows' matrices. Fine for small
models on a CPU; for a 4096-wide model, keep N and the calibration text small or use a GPU for collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOPK = 256            # tokens per position kept for the head term (by p(1-p))
LOOKUP_WEIGHT = 1.0   # lambda: the lookup term's weight against the head term (measured best of 1 and 3)
SHRINK = 10.0         # kappa: pseudo-positions of the shared covariance in every row's matrix (3..10 measured)
FIELDS = ("hidden", "top_tokens", "top_weights", "lookup_fisher", "counts")


class EmbeddingRowsError(ValueError):
    """The model cannot have per-row embedding statistics (untied, not a causal LM); one line with the fix."""


@dataclass
class EmbeddingRowStats:
    hidden: np.ndarray         # (P, D) float32: the head's input at every calibration position
    top_tokens: np.ndarray     # (P, TOPK) int32: the tokens with the largest p(1-p) there
    top_weights: np.ndarray    # (P, TOPK) float32: their p(1-p)
    lookup_fisher: np.ndarray  # (D, D) float32: mean over positions of g g^T, g = d log q(y) / d(input embedding)
    counts: np.ndarray         # (V,) float32: occurrences of each token in the calibration text
    n_rows: int                # how many rows get their own covariance

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(getattr(self, k)) for k in FIELDS}

    @classmethod
    def from_tensors(cls, get, prefix: str, n_rows: int) -> EmbeddingRowStats:
        return cls(**{k: np.asarray(get(f"{prefix}.{k}")) for k in FIELDS}, n_rows=int(n_rows))

    def row_covariances(self, shared: np.ndarray, *, lookup_weight: float = LOOKUP_WEIGHT,
                        shrink: float = SHRINK):
        """The `n_rows` rows with the most weight (head mass plus lookup count, in trace units) and a builder of
        each one's matrix, in the units of `shared` (the head's mean input covariance)."""
        from quants.compensate import RowCovariances

        n_vocab, d = self.counts.shape[0], self.hidden.shape[1]
        if shared.shape != (d, d):
            raise EmbeddingRowsError(f"embedding row statistics are {d} wide, the shared covariance is "
                                     f"{'x'.join(map(str, shared.shape))}; recompute the covariance file")
        tokens = self.top_tokens.reshape(-1).astype(np.int64)
        weights = self.top_weights.reshape(-1).astype(np.float64)
        mass = np.bincount(tokens, weights=weights, minlength=n_vocab)[:n_vocab]
        g = self.lookup_fisher.astype(np.float64)
        h = shared.astype(np.float64)
        counts = self.counts.astype(np.float64)
        score = mass + lookup_weight * counts * np.trace(g) / max(np.trace(h), 1e-30)
        chosen = np.argsort(-score, kind="stable")[:min(self.n_rows, n_vocab)]
        chosen = chosen[score[chosen] > 0]
        order = np.argsort(tokens, kind="stable")
        sorted_tokens = tokens[order]
        topk = self.top_tokens.shape[1]
        hidden = self.hidden

        def covariance(v: int) -> np.ndarray:
            lo, hi = np.searchsorted(sorted_tokens, [v, v + 1])
            entries = order[lo:hi]
            x = hidden[entries // topk].astype(np.float64) * np.sqrt(weights[entries])[:, None]
            return x.T @ x + lookup_weight * counts[v] * g + shrink * h

        return RowCovariances(rows=chosen, covariance=covariance)


def collect(model, batches: Sequence[Sequence[int]], n_rows: int, *, topk: int = TOPK,
            seed: int = 0) -> EmbeddingRowStats:
    """One forward and backward pass per chunk of a torch causal LM whose output head is its input embedding.
    G uses one label per position sampled from the model's own distribution (an unbiased Fisher estimate)."""
    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.data_ptr():
        raise EmbeddingRowsError("--embedding-rows is for a tied embedding (the output head is the token "
                                 "embedding); this model has its own output.weight, leave the option out")
    n_vocab, d = emb.shape
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    gen = torch.Generator().manual_seed(seed)
    fisher = torch.zeros(d, d, dtype=torch.float64)
    counts = np.zeros(n_vocab, dtype=np.float64)
    hidden, top_tokens, top_weights = [], [], []
    k = min(topk, n_vocab)
    trainable = [q for q in model.parameters() if q.requires_grad]
    for q in trainable:  # gradients w.r.t. the input only
        q.requires_grad_(False)
    try:
        for ids in batches:
            x = torch.tensor([list(ids)], device=emb.device)
            e = emb.detach()[x].clone().requires_grad_(True)
            captured.clear()
            logits = model(inputs_embeds=e, use_cache=False).logits[0].float()
            p = torch.softmax(logits.detach(), -1)
            y = torch.multinomial(p.cpu(), 1, generator=gen)[:, 0].to(p.device)
            torch.log_softmax(logits, -1)[torch.arange(len(ids), device=p.device), y].sum().backward()
            g = e.grad[0].double().cpu()
            fisher += g.T @ g
            np.add.at(counts, np.asarray(ids), 1)
            w, v = torch.topk(p * (1 - p), k, dim=-1)
            hidden.append(captured[-1].reshape(-1, d).float().cpu().numpy())
            top_tokens.append(v.cpu().numpy().astype(np.int32))
            top_weights.append(w.float().cpu().numpy())
    finally:
        hook.remove()
        for q in trainable:
            q.requires_grad_(True)
    n_pos = sum(len(b) for b in batches)
    return EmbeddingRowStats(hidden=np.concatenate(hidden), top_tokens=np.concatenate(top_tokens),
                             top_weights=np.concatenate(top_weights),
                             lookup_fisher=(fisher / max(n_pos, 1)).numpy().astype(np.float32),
                             counts=counts.astype(np.float32), n_rows=int(n_rows))
