"""See the model: every tensor exactly as the converter emits it (GGUF name, shape after upstream's transforms,
class, layer, whether llama.cpp would quantize it), and its float32 data, one tensor at a time.

Both functions run llama.cpp's own converter (`conversion/`) through the same hook the converter uses
(`catalog.hook`), so names and shapes cannot drift from what `convert_hf_to_gguf_strategy.py` writes.

    >>> infos = catalog.list_tensors("/models/SmolLM2-135M")        # cheap: headers only
    >>> for info, data in catalog.iter_tensors("/models/SmolLM2-135M"):   # float32, GGUF layout
    ...     err = roundtrip(data, "Q4_K")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from catalog.hook import Collector, ModelInputError, TensorInfo, no_grad, open_model, to_float32
from catalog.rules import FALLBACKS, allows_quantization, fallback_type, layer_of, tensor_class

__all__ = [
    "TensorInfo", "ModelInputError", "list_tensors", "iter_tensors", "quantizable_names",
    "allows_quantization", "fallback_type", "FALLBACKS", "tensor_class", "layer_of",
]

PathLike = str | os.PathLike


def _collect(model_dir: PathLike, llama_cpp_dir: PathLike | None = None) -> Collector:
    sink = Collector()
    model = open_model(Path(model_dir), sink, llama_cpp_dir=llama_cpp_dir)
    with no_grad():
        model.prepare_tensors()
    return sink


def list_tensors(model_dir: PathLike, *, llama_cpp_dir: PathLike | None = None) -> list[TensorInfo]:
    """Every tensor the converter writes, in write order; reads only headers (no tensor data)."""
    return [em.info for em in _collect(model_dir, llama_cpp_dir).items]


def iter_tensors(model_dir: PathLike, *, llama_cpp_dir: PathLike | None = None,
                 names: set[str] | None = None) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """(info, float32 data in GGUF layout), one tensor at a time; each array is freed once you drop it.

    `names` restricts to those tensors (the others are never read). Tensors that model code writes already
    packed (e.g. NVFP4 blocks) are dequantized to float32.
    """
    items = _collect(model_dir, llama_cpp_dir).items
    items.reverse()  # pop from the end, so each lazy graph is released as soon as it was yielded
    while items:
        em = items.pop()
        if names is not None and em.info.name not in names:
            continue
        with no_grad():
            if em.raw and em.raw_dtype is not None and np.dtype(em.data.dtype) == np.uint8:
                import quants

                data = quants.dequantize(np.asarray(em.data), em.raw_dtype)
            else:
                data = to_float32(em.data)
        info = em.info
        del em
        yield info, data


def quantizable_names(infos: list[TensorInfo]) -> list[str]:
    return [i.name for i in infos if i.quantizable]
