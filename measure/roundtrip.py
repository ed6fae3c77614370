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
                 backend: str, hessian: np.ndarray | None = None) -> np.ndarray:
    if hessian is not None:  # error-compensated encoding: our quantizer walks the blocks (see quants.compensate)
        return quants.quantize(rows, qtype, importance, name=name, hessian=hessian)
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
    writes the same bytes (quants is bit-exact with it), to cross-check."""
    if backend not in BACKENDS:
        raise quants.QuantInputError(f"unknown quantizer backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if data.ndim == 3 and importance is not None and np.ndim(importance) == 2:  # per expert (also for ggml)
        return np.stack([_quantize_2d(rows, qtype, imp, name, backend) for rows, imp in _matrices(data, importance)])
    return _quantize_2d(data, qtype, importance, name, backend)


@dataclass(frozen=True)
class Errors:
    rmse: float
    max_abs_err: float
    wmse: float
    rel_err: float
    cos: float


class ErrorSums:
    """Running sums behind `Errors`, so a tensor can be round-tripped and scored a few hundred rows at a time.

    Why chunks: a whole-tensor round trip makes a dequantized copy, an error array and its square, each as big as
    the tensor; for SmolLM2's 28M-weight embedding that is several 113 MB passes per type through memory, which
    cost more than the quantization of the cheap types. Chunks of ~256K weights stay in the core's cache. Row
    sums are float32 (a row is short), everything else float64."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = self.wnum = self.wden = self.wn2 = self.rn2 = self.dot = 0.0
        self.max_abs = 0.0

    def add(self, w: np.ndarray, r: np.ndarray, importance: np.ndarray | None,
            hessian: np.ndarray | None = None) -> None:
        """w, r: (rows, n_per_row) float32; importance: (n_per_row,) or None.

        With `hessian` (the input covariance, whose diagonal is the importance) the weighted error is the output
        error e H e^T over tr(H), which equals the importance-weighted error when H is diagonal: the quantity an
        error-compensated encoding minimises (its weight-space error is larger than plain rounding's by design)."""
        n_per_row = w.shape[-1]
        w2 = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, n_per_row)
        r2 = np.ascontiguousarray(r, dtype=np.float32).reshape(-1, n_per_row)
        if w2.size == 0:
            return
        err = r2 - w2
        self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        sq = np.square(err, out=err)
        sse = float(sq.sum(axis=1).sum(dtype=np.float64))
        self.sse += sse
        if hessian is not None:
            h = np.asarray(hessian, dtype=np.float32)
            e = r2 - w2
            self.wnum += float(np.einsum("ij,ij->i", e @ h, e).sum(dtype=np.float64))
            self.wden += float(np.trace(h.astype(np.float64))) * e.shape[0]
        elif importance is None:
            self.wnum += sse
            self.wden += float(sq.size)
        else:
            imp = np.asarray(importance, dtype=np.float32)
            self.wnum += float((sq @ imp).sum(dtype=np.float64))
            self.wden += float(imp.astype(np.float64).sum()) * sq.shape[0]
        self.wn2 += float(np.einsum("ij,ij->i", w2, w2).sum(dtype=np.float64))
        self.rn2 += float(np.einsum("ij,ij->i", r2, r2).sum(dtype=np.float64))
        self.dot += float(np.einsum("ij,ij->i", w2, r2).sum(dtype=np.float64))
        self.n += w2.size

    def result(self) -> Errors:
        n, sse = self.n, self.sse
        wmse = self.wnum / self.wden if self.wden > 0 else (sse / n if n else 0.0)
        wn, rn = math.sqrt(self.wn2), math.sqrt(self.rn2)
        cos = self.dot / (wn * rn) if wn > 0 and rn > 0 else (1.0 if wn == rn else 0.0)
        return Errors(
            rmse=math.sqrt(sse / n) if n else 0.0,
            max_abs_err=self.max_abs,
            wmse=wmse,
            rel_err=math.sqrt(sse) / wn if wn > 0 else (0.0 if sse == 0 else math.inf),
            cos=min(cos, 1.0),
        )


CHUNK_WEIGHTS = 1 << 18


def _row_slices(n_rows: int, n_per_row: int, target: int = CHUNK_WEIGHTS):
    step = max(1, target // max(1, n_per_row))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def _matrices(data: np.ndarray, importance: np.ndarray | None):
    """(2-D rows, importance vector or None) pieces: per expert when the importance is per expert."""
    if data.ndim == 3 and importance is not None and np.ndim(importance) == 2:
        for e in range(data.shape[0]):
            yield data[e], importance[e]
    else:
        yield data.reshape(-1, data.shape[-1]), importance


def error_stats(w: np.ndarray, r: np.ndarray, importance: np.ndarray | None) -> Errors:
    """Error numbers of round trip r against original w.

    wmse = sum_ij imp_j err_ij^2 / sum_ij imp_j, with imp broadcast per expert for 3-D tensors; plain MSE when
    there is no importance."""
    acc = ErrorSums()
    for (w2, imp), (r2, _) in zip(_matrices(w, importance), _matrices(r, importance)):
        for sl in _row_slices(w2.shape[0], w2.shape[-1]):
            acc.add(w2[sl], r2[sl], imp)
    return acc.result()


def chunked_errors(data: np.ndarray, qtype: str, importance: np.ndarray | None, name: str | None = None,
                   backend: str = "numpy", hessian: np.ndarray | None = None) -> Errors:
    """error_stats(data, round_trip(data, ...)) a chunk of rows at a time (same bytes: every type quantizes each
    row on its own given the importance), never holding a whole-tensor copy."""
    acc = ErrorSums()
    for rows, imp in _matrices(data, importance):
        for sl in _row_slices(rows.shape[0], rows.shape[-1]):
            chunk = np.ascontiguousarray(rows[sl], dtype=np.float32)
            h = hessian if data.ndim == 2 else None
            q = _quantize_2d(chunk, qtype, imp, name, backend, h)
            acc.add(chunk, quants.dequantize(q, qtype).reshape(chunk.shape), imp, h)
    return acc.result()


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
                   sample: float = 1.0, hessian: np.ndarray | None = None) -> Measurement | None:
    """Measurement of one tensor at one type, or None when the type does not fit the row length.

    `sample` < 1 round-trips only that fraction of rows (at least MIN_SAMPLE_ROWS); sizes stay exact."""
    if not applicable(data.shape, qtype):
        return None
    part = sample_rows(data, sample, name)
    e = chunked_errors(part, qtype, importance, name, backend, hessian)
    n_bytes = tensor_bytes(data.shape, qtype)
    n = int(np.prod(data.shape))
    return Measurement(tensor=name, qtype=qtype, n_params=n, n_bytes=n_bytes,
                       bpw=8.0 * n_bytes / n, rmse=e.rmse, max_abs_err=e.max_abs_err, wmse=e.wmse,
                       rel_err=e.rel_err, cos=e.cos, tensor_class=tensor_class, layer=layer,
                       sample=float(part.size) / n)
