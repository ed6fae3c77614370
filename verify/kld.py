"""KL-divergence and perplexity statistics, computed exactly as llama-perplexity --kl-divergence does.

The base model's log-probabilities are stored per token as llama.cpp's 16-bit rows: two float32 header
values (scale, min_log_prob) then one uint16 per vocabulary entry, covering the 16 nats below the top
logit. Candidates are compared against those rows, so both engines see the same (rounded) base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LOG_PROB_RANGE = 16.0  # nats below the top logit that the 16-bit rows keep


def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: 4 for the two float32 header values, vocab padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def _log_sum_exp(logits: np.ndarray, max_logit: np.ndarray) -> np.ndarray:
    # float32 exponentials summed in float64, as llama.cpp sums expf() into a double
    return np.log(np.exp(logits - max_logit[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)


def encode_logprobs(logits: np.ndarray, tokens_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, n_vocab) float32 logits -> ((n, row_width) uint16 rows, (n,) float64 NLL of the next tokens)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    max_logit = logits.max(axis=1)
    min_logit = np.maximum(logits.min(axis=1), max_logit - np.float32(LOG_PROB_RANGE))
    lse = _log_sum_exp(logits, max_logit)
    min_log_prob = (min_logit - max_logit - lse).astype(np.float32)
    scale = ((max_logit - min_logit) / np.float32(65535.0)).astype(np.float32)
    rows = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    header = rows[:, :4].view(np.float32)
    header[:, 0] = scale
    header[:, 1] = min_log_prob
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
        q = np.rint(inv[:, None] * (logits - min_logit[:, None]))
    q = np.where(logits > min_logit[:, None], q, 0.0)
    rows[:, 4:4 + n_vocab] = np.clip(q, 0, 65535).astype(np.uint16)
    nll = (max_logit + lse - logits[np.arange(n), tokens_next]).astype(np.float64)
    return rows, nll


def decode_logprobs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """(n, row_width) uint16 rows -> (n, n_vocab) float32 log-probabilities (as llama.cpp reconstructs them)."""
    header = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    scale, min_log_prob = header[:, 0:1], header[:, 1:2]
    return (scale * rows[:, 4:4 + n_vocab].astype(np.float32) + min_log_prob).astype(np.float32)


@dataclass
class TokenStats:
    """Per-scored-token values; concatenated over chunks before summarising."""

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    p_diff: np.ndarray

    @staticmethod
    def concat(parts: list[TokenStats]) -> TokenStats:
        return TokenStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("nll", "nll_base", "kld", "same_top", "p_diff")))


def compare_logits(logits: np.ndarray, base_rows: np.ndarray, tokens_next: np.ndarray) -> TokenStats:
    """Candidate logits (n, n_vocab) vs base rows (n, row_width) for the tokens that follow each position."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, n_vocab = logits.shape
    idx = np.arange(n)
    max_logit = logits.max(axis=1)
    imax = logits.argmax(axis=1)
    lse = _log_sum_exp(logits, max_logit)
    nll = (max_logit + lse - logits[idx, tokens_next]).astype(np.float32)
    base_lp = decode_logprobs(base_rows, n_vocab)
    nll_base = -base_lp[idx, tokens_next]
    log_q = logits - (max_logit + lse)[:, None]
    keep = base_lp > -LOG_PROB_RANGE
    terms = np.where(keep, np.exp(base_lp) * (base_lp - log_q), np.float32(0.0))
    kld = terms.sum(axis=1, dtype=np.float64)
    same = imax == base_lp.argmax(axis=1)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return TokenStats(nll.astype(np.float64), nll_base.astype(np.float64), kld, same, p_diff.astype(np.float64))


def _mean_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, the way llama.cpp's mean_and_uncertainty computes them."""
    n = values.size
    if n < 1:
        return 0.0, 0.0
    mean = float(values.sum() / n)
    var = float((values * values).sum() / n - mean * mean)
    return mean, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    p = fraction * (sorted_values.size - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, sorted_values.size - 1)])


@dataclass
class Metrics:
    """One model's numbers on one text; KLD fields are None for the base itself (PPL only)."""

    n_tokens: int
    ppl: float
    ppl_err: float
    ppl_base: float | None = None
    ppl_base_err: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_p999: float | None = None
    kld_max: float | None = None
    same_top: float | None = None  # percent
    same_top_err: float | None = None
    rms_dp: float | None = None  # percent

    def to_dict(self) -> dict:
        return asdict(self)


def ppl_from_nll(nll: np.ndarray) -> Metrics:
    mean, err = _mean_err(np.asarray(nll, dtype=np.float64))
    ppl = float(np.exp(mean))
    return Metrics(n_tokens=int(np.size(nll)), ppl=ppl, ppl_err=ppl * err)


def summarize(stats: TokenStats) -> Metrics:
    """Final statistics over all scored tokens (llama-perplexity's end-of-run block)."""
    m = ppl_from_nll(stats.nll)
    base = ppl_from_nll(stats.nll_base)
    m.ppl_base, m.ppl_base_err = base.ppl, base.ppl_err
    m.kld_mean, m.kld_err = _mean_err(stats.kld)
    s = np.sort(stats.kld.astype(np.float32))
    m.kld_median = float(np.median(s))
    m.kld_p99 = _percentile(s, np.float32(0.99))
    m.kld_p999 = _percentile(s, np.float32(0.999))
    m.kld_max = float(s[-1])
    n = stats.same_top.size
    top = float(stats.same_top.sum() / n)
    m.same_top = 100.0 * top
    m.same_top_err = 100.0 * float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else 0.0
    m.rms_dp = 100.0 * float(np.sqrt(np.mean(stats.p_diff ** 2)))
    return m
