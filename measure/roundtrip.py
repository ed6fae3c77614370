"""One tensor through one GGUF type and back: the error numbers strategy/ ranks types by.

Quantization is done exactly as the converter (and llama-quantize) do it: `quants.quantize` with the imatrix
importance of that tensor, per expert for 3-D `_exps` tensors (each expert with its own importance slice), no
importance when the imatrix has no entry for the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import quants
from measure.records import Measurement

DEFAULT_TYPES: tuple[str, ...] = (
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K", "Q2_K",
)


def parse_types(spec: str | None) -> list[str]:
    """'q8_0, Q4_K' -> ['Q8_0', 'Q4_K'] (case-insensitive, deduplicated, order kept); None -> defaults."""
    if spec is None or not spec.strip():
        return list(DEFAULT_TYPES)
    out: list[str] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        name = quants.type_name(quants.parse_type(part))
        if quants.parse_type(name) not in quants.WRITABLE_TYPES:
            raise quants.QuantInputError(f"type {name} cannot be written by this project; valid: "
                                         + ", ".join(t.name for t in quants.WRITABLE_TYPES))
        if name not in out:
            out.append(name)
    if not out:
        raise quants.QuantInputError(f"--types {spec!r} names no type")
    return out


def applicable(shape: tuple[int, ...], qtype: str) -> bool:
    """A type fits a tensor when its rows are whole blocks (otherwise ggml cannot store it at all)."""
    return shape[-1] % quants.block_size(qtype) == 0


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return n_rows * quants.row_bytes(qtype, int(shape[-1]))


BACKENDS = ("numpy", "ggml")


def _quantize_2d(rows: np.ndarray, qtype: str, importance: np.ndarray | None, name: str | None,
                 backend: str) -> np.ndarray:
    if backend == "ggml" and qtype not in ("F32", "F16", "BF16"):
        from llamacpp.ggml import ggml_quantize

        rows = np.asarray(rows, dtype=np.float32)
        out = ggml_quantize(rows.reshape(-1, rows.shape[-1]), int(quants.parse_type(qtype)), importance)
        return out.reshape(*rows.shape[:-1], out.shape[-1])
    return quants.quantize(rows, qtype, importance, name=name)


def quantize_tensor(data: np.ndarray, qtype: str, importance: np.ndarray | None, name: str | None = None,
                    backend: str = "numpy") -> np.ndarray:
    """Bytes of the whole tensor as the converter writes them (per-expert importance for 3-D tensors).

    backend "numpy" is the converter's own quantizer (`quants`); "ggml" calls the reference libggml-base, which
    writes the same bytes (quants is bit-exact with it) several times faster, for measuring big models."""
    if backend not in BACKENDS:
        raise quants.QuantInputError(f"unknown quantizer backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if data.ndim == 3 and importance is not None and np.ndim(importance) == 2:
        return np.stack([_quantize_2d(data[e], qtype, importance[e], name, backend) for e in range(data.shape[0])])
    return _quantize_2d(data, qtype, importance, name, backend)


def round_trip(data: np.ndarray, qtype: str, importance: np.ndarray | None, name: str | None = None,
               backend: str = "numpy") -> np.ndarray:
    q = quantize_tensor(data, qtype, importance, name, backend)
    return quants.dequantize(q, qtype).reshape(data.shape)


@dataclass(frozen=True)
class Errors:
    rmse: float
    max_abs_err: float
    wmse: float
    rel_err: float
    cos: float


def error_stats(w: np.ndarray, r: np.ndarray, importance: np.ndarray | None) -> Errors:
    """Error numbers of round trip r against original w.

    wmse = sum_ij imp_j err_ij^2 / sum_ij imp_j, with imp broadcast per expert for 3-D tensors; plain MSE when
    there is no importance. Row sums are float32 (a row is short), rows are summed in float64: exact enough for
    ranking and several times faster than float64 throughout."""
    n_per_row = w.shape[-1]
    w2 = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, n_per_row)
    r2 = np.ascontiguousarray(r, dtype=np.float32).reshape(-1, n_per_row)
    err = r2 - w2
    sq = err * err
    n = err.size
    sse = float(sq.sum(axis=1).sum(dtype=np.float64))
    if importance is None:
        wmse = sse / n
    else:
        imp = np.asarray(importance, dtype=np.float32)
        if imp.ndim == 2:  # per expert: rows of expert e use imp[e]
            n_exp = imp.shape[0]
            per_row = np.einsum("erj,ej->er", sq.reshape(n_exp, -1, n_per_row), imp).astype(np.float64)
            denom = float(imp.astype(np.float64).sum(axis=1) @ np.full(n_exp, sq.shape[0] // n_exp, np.float64))
        else:
            per_row = (sq @ imp).astype(np.float64)
            denom = float(imp.astype(np.float64).sum()) * sq.shape[0]
        wmse = float(per_row.sum()) / denom if denom > 0 else sse / n
    del sq
    wn2 = float(np.einsum("ij,ij->i", w2, w2).sum(dtype=np.float64))
    rn2 = float(np.einsum("ij,ij->i", r2, r2).sum(dtype=np.float64))
    dot = float(np.einsum("ij,ij->i", w2, r2).sum(dtype=np.float64))
    wn, rn = math.sqrt(wn2), math.sqrt(rn2)
    cos = dot / (wn * rn) if wn > 0 and rn > 0 else (1.0 if wn == rn else 0.0)
    return Errors(
        rmse=math.sqrt(sse / n),
        max_abs_err=float(np.abs(err).max()) if n else 0.0,
        wmse=wmse,
        rel_err=math.sqrt(sse) / wn if wn > 0 else (0.0 if sse == 0 else math.inf),
        cos=min(cos, 1.0),
    )


MIN_SAMPLE_ROWS = 256


def sample_rows(data: np.ndarray, fraction: float, name: str, min_rows: int = MIN_SAMPLE_ROWS) -> np.ndarray:
    """A fixed (name-seeded) subset of rows, the same count from every expert; the whole tensor if fraction >= 1.

    Every type here quantizes each row on its own (given the importance), so the sampled rows' errors are exactly
    the errors those rows get in the full tensor: the statistics are unbiased estimates, max_abs_err a lower bound."""
    n_rows = data.shape[-2] if data.ndim >= 2 else 1
    k = max(min_rows, int(np.ceil(fraction * n_rows)))
    if fraction >= 1.0 or data.ndim < 2 or k >= n_rows:
        return np.asarray(data)
    import zlib

    rows = np.sort(np.random.default_rng(zlib.crc32(name.encode())).choice(n_rows, size=k, replace=False))
    return np.ascontiguousarray(np.asarray(data)[..., rows, :])


def measure_tensor(name: str, data: np.ndarray, qtype: str, importance: np.ndarray | None, *,
                   tensor_class: str = "", layer: int | None = None, backend: str = "numpy",
                   sample: float = 1.0) -> Measurement | None:
    """Measurement of one tensor at one type, or None when the type does not fit the row length.

    `sample` < 1 round-trips only that fraction of rows (at least MIN_SAMPLE_ROWS); sizes stay exact."""
    if not applicable(data.shape, qtype):
        return None
    part = sample_rows(data, sample, name)
    r = round_trip(part, qtype, importance, name, backend)
    e = error_stats(part, r, importance)
    n_bytes = tensor_bytes(data.shape, qtype)
    n = int(np.prod(data.shape))
    return Measurement(tensor=name, qtype=qtype, n_params=n, n_bytes=n_bytes,
                       bpw=8.0 * n_bytes / n, rmse=e.rmse, max_abs_err=e.max_abs_err, wmse=e.wmse,
                       rel_err=e.rel_err, cos=e.cos, tensor_class=tensor_class, layer=layer,
                       sample=float(part.size) / n)
