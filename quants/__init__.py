"""Float32 rows -> GGUF block bytes, for every type this project writes, matching ggml bit for bit.

gguf-py (0.19.0) quantizes F16/BF16/Q8_0 and the legacy types without an importance vector; the K-quants,
IQ4_NL/IQ4_XS and the importance-weighted legacy paths are ours (one module per type, vectorised over
blocks). Importing this package registers our quantizers into gguf's registry, so upstream code that calls
`gguf.quants.quantize(x, GGMLQuantizationType.Q4_K)` works unchanged (see `register`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "QuantInputError", "WRITABLE_TYPES", "quantize", "dequantize", "parse_type", "type_name",
    "block_size", "row_bytes", "register", "requires_importance", "round_trip",
]

T = GGMLQuantizationType


class QuantInputError(ValueError):
    """Bad data for a quantizer (NaN, wrong row length, bad importance); the message names the fix."""


# type -> "module:function" of our numpy quantizer: fn(rows_f32_2d, importance_or_None) -> uint8 (n_rows, row_bytes).
# Types absent here but in _GGUF_NATIVE are quantized by gguf-py itself (importance ignored, as ggml does).
_OWN: dict[GGMLQuantizationType, str] = {
    T.Q2_K: "quants.q2_k:quantize_q2_k",
    T.Q3_K: "quants.q3_k:quantize_q3_k",
    T.Q4_K: "quants.q4_k:quantize_q4_k",
    T.Q5_K: "quants.q5_k:quantize_q5_k",
    T.Q6_K: "quants.q6_k:quantize_q6_k",
    T.IQ4_NL: "quants.iq4:quantize_iq4_nl",
    T.IQ4_XS: "quants.iq4:quantize_iq4_xs",
    T.Q4_0: "quants.q4_0:quantize_q4_0",
    T.Q4_1: "quants.q4_1:quantize_q4_1",
    T.Q5_0: "quants.q5_0:quantize_q5_0",
    T.Q5_1: "quants.q5_1:quantize_q5_1",
}
# Without importance, gguf-py's quantizer is ggml's *_ref path byte for byte. (Not Q4_1/Q5_1: gguf-py writes a
# zero minimum as +0.0 where ggml keeps the sign of the block's first zero, so ours handle those.)
_GGUF_REF_EXACT = (T.Q4_0, T.Q5_0)
# Quantized by gguf-py; ggml ignores the importance vector for these too.
_GGUF_NATIVE = (T.F32, T.F16, T.BF16, T.Q8_0)

WRITABLE_TYPES: tuple[GGMLQuantizationType, ...] = (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0,
    T.IQ4_XS, T.IQ4_NL, T.Q3_K, T.Q2_K,
)


def parse_type(name: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """'q4_k', 'Q4_K', 'iq4_xs' or a ggml type id -> GGMLQuantizationType; one-line error otherwise."""
    if isinstance(name, GGMLQuantizationType):
        return name
    if isinstance(name, int):
        return GGMLQuantizationType(name)
    key = str(name).strip().upper()
    try:
        return GGMLQuantizationType[key]
    except KeyError:
        valid = ", ".join(t.name for t in WRITABLE_TYPES)
        raise QuantInputError(f"unknown quantization type {name!r}; valid types: {valid}") from None


def type_name(qtype: GGMLQuantizationType | int | str) -> str:
    return parse_type(qtype).name


def block_size(qtype: GGMLQuantizationType | str) -> int:
    return GGML_QUANT_SIZES[parse_type(qtype)][0]


def row_bytes(qtype: GGMLQuantizationType | str, n_per_row: int) -> int:
    bs, ts = GGML_QUANT_SIZES[parse_type(qtype)]
    return n_per_row // bs * ts


def requires_importance(qtype: GGMLQuantizationType | str) -> bool:
    """Types ggml refuses to quantize without an imatrix (none of the ones we write today)."""
    return parse_type(qtype) in (T.IQ2_XXS, T.IQ2_XS, T.IQ1_S)


def _own_quantizer(qtype: GGMLQuantizationType) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    module_name, fn_name = _OWN[qtype].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _check_inputs(data: np.ndarray, qtype: GGMLQuantizationType, importance: np.ndarray | None,
                  name: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    what = f"tensor {name!r}" if name else "tensor"
    rows = np.asarray(data, dtype=np.float32)
    if rows.ndim == 0:
        raise QuantInputError(f"{what}: cannot quantize a scalar")
    n_per_row = rows.shape[-1]
    bs = GGML_QUANT_SIZES[qtype][0]
    if n_per_row % bs != 0:
        raise QuantInputError(
            f"{what}: row length {n_per_row} is not a multiple of the {qtype.name} block size {bs}; "
            f"choose another type for it (the converter falls back as llama-quantize does)")
    if not np.isfinite(rows).all():
        bad = int(np.size(rows) - np.isfinite(rows).sum())
        raise QuantInputError(f"{what}: {bad} NaN/Inf value(s); fix or re-export the checkpoint")
    imp = None
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape[0] != n_per_row:
            raise QuantInputError(
                f"{what}: importance vector has {imp.shape[0]} entries, the row has {n_per_row}; "
                f"is the imatrix for another model?")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise QuantInputError(f"{what}: importance vector has negative, NaN or Inf entries; the imatrix is corrupt")
    return rows, imp


def quantize(data: np.ndarray, qtype: GGMLQuantizationType | str, importance: np.ndarray | None = None,
             *, name: str | None = None, hessian: np.ndarray | None = None,
             row_covariances: Any = None) -> np.ndarray:
    """Quantize like ggml_quantize_chunk(type, data, importance); bytes laid out as gguf-py lays them out.

    Returns an array of shape data.shape[:-1] + (row_bytes,), dtype uint8 (float16/float32 for F16/F32,
    as gguf.quants.quantize returns them). A 2-D importance with 3-D data is per expert (an imatrix's `_exps`
    entry): expert e is quantized with importance[e], as llama-quantize does.
    `hessian` (the input covariance, K x K, of a 2-D weight) selects the error-compensated encoding
    (`quants.compensate`): same types, blocks that ggml decodes, chosen to cancel output error.
    `row_covariances` (a `quants.compensate.RowCovariances`, with `hessian` only): rows with a covariance of
    their own, re-encoded under it.
    """
    if row_covariances is not None and hessian is None:
        raise QuantInputError(f"{f'tensor {name!r}' if name else 'tensor'}: row covariances need the tensor's "
                              f"shared input covariance too (hessian)")
    if hessian is not None:
        if np.ndim(data) != 2:
            raise QuantInputError(f"{f'tensor {name!r}' if name else 'tensor'}: error compensation is for 2-D weights; "
                                  f"quantize this {np.ndim(data)}-D tensor without an input covariance")
        from quants.compensate import quantize_compensated

        rows, imp = _check_inputs(data, parse_type(qtype), importance, name)
        if row_covariances is not None:
            from quants.compensate import quantize_compensated_rows

            return quantize_compensated_rows(rows, qtype, imp, hessian, row_covariances, name=name)
        return quantize_compensated(rows, qtype, imp, hessian, name=name)
    if importance is not None and np.ndim(importance) == 2 and np.ndim(data) == 3:
        return np.stack([quantize(data[e], qtype, importance[e], name=f"{name or 'tensor'}[expert {e}]")
                         for e in range(data.shape[0])])
    qtype = parse_type(qtype)
    rows, imp = _check_inputs(data, qtype, importance, name)
    if qtype in _OWN:
        if qtype in _GGUF_REF_EXACT and imp is None:
            return _gguf_quants().quantize(rows, qtype)  # ggml's *_ref path, which gguf-py implements
        shape = rows.shape
        flat = rows.reshape(-1, shape[-1])
        out = _own_quantizer(qtype)(np.ascontiguousarray(flat), imp)
        return out.reshape(*shape[:-1], out.shape[-1])
    if qtype in _GGUF_NATIVE:
        return _gguf_quants().quantize(rows, qtype)
    raise QuantInputError(f"type {qtype.name} cannot be written by this project; valid: "
                          + ", ".join(t.name for t in WRITABLE_TYPES))


_DEQUANT_CHUNK = 1 << 20  # weights decoded per gguf-py call


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType | str) -> np.ndarray:
    """Bytes -> float32, by gguf-py (which dequantizes every type we write).

    gguf-py decodes 16 rows of its input per call, so a (blocks, block bytes) array would cost a Python call per
    16 blocks; the blocks are handed over as rows of about a million weights instead (the same values)."""
    qtype = parse_type(qtype)
    gq = _gguf_quants()
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data)
    if qtype in (T.F32, T.F16, T.BF16) or raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] % ts:
        return np.asarray(gq.dequantize(data, qtype), dtype=np.float32)
    blocks = raw.reshape(-1, ts)
    per = max(1, _DEQUANT_CHUNK // bs)
    out = np.empty((blocks.shape[0], bs), dtype=np.float32)
    for b0 in range(0, blocks.shape[0], per):
        part = blocks[b0:b0 + per]
        out[b0:b0 + len(part)] = np.asarray(gq.dequantize(part.reshape(1, -1), qtype), dtype=np.float32).reshape(-1, bs)
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // ts * bs)


def round_trip(data: np.ndarray, qtype: GGMLQuantizationType | str, importance: np.ndarray | None = None,
               *, name: str | None = None, hessian: np.ndarray | None = None) -> np.ndarray:
    """What a tensor becomes after being written as `qtype` and read back (float32, data's shape)."""
    return dequantize(quantize(data, qtype, importance, name=name, hessian=hessian), qtype).reshape(np.shape(data))


def compiled_kernel(fn: Callable, **options: Any) -> Callable | None:
    """`fn` compiled by numba (cached, nogil), or None without numba or when it cannot compile: the callers keep a
    numpy reference and use the kernel only after checking it against it."""
    try:
        import numba
    except ImportError:  # pragma: no cover
        return None
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except Exception:  # pragma: no cover - e.g. no cache locator on a read-only install
        return None


def _gguf_quants() -> ModuleType:
    return sys.modules["gguf"].quants if "gguf" in sys.modules else importlib.import_module("gguf.quants")


def register(gguf_module: ModuleType | None = None) -> None:
    """Make `gguf.quants.quantize(x, qtype)` use our quantizers for the types gguf-py cannot quantize.

    Call again with the upstream converter's own `gguf` module when that is a different copy
    (llama.cpp's gguf-py differs from PyPI's); idempotent.
    """
    gq = (gguf_module or sys.modules.get("gguf") or importlib.import_module("gguf")).quants
    for qtype in _OWN:
        cls = gq._type_traits.get(qtype)
        if cls is None or getattr(cls, "_gguf_strategy_registered", False):
            continue
        if qtype in _GGUF_REF_EXACT:
            continue  # gguf-py's own quantize_blocks already is ggml's reference path

        def quantize_blocks(_cls, blocks: np.ndarray, _qtype=qtype) -> np.ndarray:
            # gguf-py hands over (n_blocks, block_size) float32; our quantizers work on rows of whole blocks
            bs = GGML_QUANT_SIZES[_qtype][0]
            flat = np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, bs)
            out = _own_quantizer(_qtype)(flat, None)
            return out.reshape(blocks.shape[0], -1) if blocks.ndim == 2 else out.reshape(*blocks.shape[:-1], -1)

        cls.quantize_blocks = classmethod(quantize_blocks)
        cls._gguf_strategy_registered = True


register()
