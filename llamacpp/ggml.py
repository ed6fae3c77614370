"""ctypes binding to libggml-base: ggml's own quantizers, the ground truth our numpy ones are tested against."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

from llamacpp.reference import find_reference


@cache
def load_libggml(path: str | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path or find_reference().libggml_base()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.c_void_p
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(data: np.ndarray, qtype: int, importance: np.ndarray | None = None,
                  lib_path: str | Path | None = None) -> np.ndarray:
    """Quantize 2-D float32 rows with ggml_quantize_chunk; returns (n_rows, row_bytes) uint8.

    ggml aborts the process (no exception) on bad arguments, so they are checked here first.
    """
    lib = load_libggml(str(lib_path) if lib_path else None)
    qtype = int(qtype)
    rows = np.ascontiguousarray(data, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    rows = rows.reshape(-1, rows.shape[-1])
    n_rows, n_per_row = rows.shape
    if importance is None and lib.ggml_quantize_requires_imatrix(qtype):
        raise ValueError(f"ggml type {qtype} requires an importance matrix")
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance, dtype=np.float32)
        if imp.shape != (n_per_row,):
            raise ValueError(f"importance has shape {imp.shape}, expected ({n_per_row},)")
    row_bytes = lib.ggml_row_size(qtype, n_per_row)
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        qtype, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
        imp.ctypes.data if imp is not None else None,
    )
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_dequantize(blocks: np.ndarray, qtype: int, n_per_row: int,
                    lib_path: str | Path | None = None) -> np.ndarray:
    """Dequantize with ggml's to_float (from ggml_get_type_traits); returns (n_rows, n_per_row) float32."""
    lib = load_libggml(str(lib_path) if lib_path else None)
    traits = lib.ggml_get_type_traits(int(qtype))

    # struct ggml_type_traits { const char *type_name; int64_t blck_size; int64_t blck_size_interleave;
    #   size_t type_size; bool is_quantized; ggml_to_float_t to_float; ggml_from_float_t from_float_ref; }
    class _Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    t = _Traits.from_address(traits)
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(t.to_float)
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    n_rows = src.size // lib.ggml_row_size(int(qtype), n_per_row)
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    to_float(src.ctypes.data, out.ctypes.data, n_rows * n_per_row)
    return out
