"""The one hook into llama.cpp's upstream converter, shared by the catalog and convert_hf_to_gguf_strategy.py.

How it works: upstream's `ModelBase.prepare_tensors` maps names, applies every architecture transform (permutes,
expert stacking, fusions), decides which tensors stay F32, and hands each result to `gguf_writer.add_tensor`
with the data still lazy. We subclass the model class that `conversion.get_model_class` returns and:

* run `prepare_tensors` with `gguf.quants.quantize` swapped (for that call only) for a function that returns a
  `_Deferred` wrapper around the untouched float tensor, so nothing is rounded to F16 and the float32 source
  stays reachable;
* pass `ftype=MOSTLY_F16` so upstream's own decision shows in the type it asks for: F32 means "upstream keeps
  this tensor in float32" (1-D, norms, its F32-forced list), F16 means "upstream would quantize it";
* record what an architecture's `tensor_force_quant` forces;
* intercept `gguf_writer.add_tensor` and give each tensor (name, shape, upstream decision, lazy float32 data) to
  a sink: the catalog records it, the converter picks the type and binds importance into a new lazy node.

Nothing is quantized here; quantization stays lazy and happens when the writer writes the tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catalog.rules import allows_quantization, layer_of, tensor_class


class ModelInputError(ValueError):
    """Bad model directory or checkpoint; the message is one line naming the path and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor exactly as the converter emits it.

    `shape` is the numpy shape of the data in GGUF layout (rows last: (n_expert, n_rows, n_per_row) for MoE
    experts); `ne` is the same in ggml's order. `quantizable` is llama.cpp's rule (upstream converter's F32 list
    and llama-quantize's tensor_allows_quantization); `fixed_type` is the type written when it is not quantizable.
    """

    name: str
    shape: tuple[int, ...]
    n_params: int
    cls: str
    layer: int | None
    quantizable: bool
    fixed_type: str | None
    source_dtype: str

    @property
    def n_dims(self) -> int:
        return len(self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_per_row(self) -> int:
        return self.shape[-1]

    @property
    def n_expert(self) -> int:
        """Number of expert matrices (1 unless a 3-D `_exps` tensor)."""
        return self.shape[0] if len(self.shape) == 3 else 1


@dataclass
class Emitted:
    """What upstream handed to add_tensor, before any type decision."""

    info: TensorInfo
    data: Any                         # float tensor: gguf LazyNumpyTensor, np.ndarray or LazyChunkedTensor
    upstream_type: Any                # GGMLQuantizationType upstream asked for (F16 base, see module doc)
    forced: Any = None                # what tensor_force_quant returned, when not False
    raw: bool = False                 # added directly by model code (already final bytes): write as given
    raw_dtype: Any = None
    raw_shape: Any = None


Sink = Callable[[Any, Emitted], None]


# ------------------------------------------------------------------------------------------------ upstream
def activate(llama_cpp_dir: str | os.PathLike | None = None) -> Path:
    """Make upstream's `conversion` and gguf-py importable (pinned version); returns the sources dir."""
    from llamacpp.upstream import activate as _activate

    return _activate(llama_cpp_dir)


def _gguf():
    import gguf

    return gguf


# ------------------------------------------------------------------------------------------------ input checks
def check_safetensors(path: Path) -> None:
    """A truncated or corrupt .safetensors fails here with one line, not deep inside a lazy read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ModelInputError(f"{path}: corrupt or truncated safetensors header; re-download the file")
            meta = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelInputError(f"{path}: corrupt safetensors header (not JSON); re-download the file") from None
    except OSError as e:
        raise ModelInputError(f"{path}: cannot read ({e.strerror})") from None
    end = 0
    for name, m in meta.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(m["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ModelInputError(f"{path}: corrupt safetensors header (tensor {name!r}); re-download the file") from None
    if 8 + n + end > size:
        raise ModelInputError(f"{path}: truncated safetensors file: {size} bytes, the header needs {8 + n + end}; "
                              "re-download it")


def check_model_dir(model_dir: Path, mistral_format: bool = False) -> None:
    if not model_dir.is_dir():
        raise ModelInputError(f"{model_dir}: not a directory; pass the folder of a Hugging Face checkpoint")
    cfg = "params.json" if mistral_format else "config.json"
    if not (model_dir / cfg).is_file():
        raise ModelInputError(f"{model_dir}: not a model directory (no {cfg}); pass the folder of a Hugging Face "
                              "checkpoint (config.json + *.safetensors)")
    parts = sorted(model_dir.glob("*.safetensors"))
    if not parts and not list(model_dir.glob("pytorch_model*.bin")) and not list(model_dir.glob("consolidated*")):
        raise ModelInputError(f"{model_dir}: no *.safetensors weights found; download the model's weights too")
    for p in parts:
        check_safetensors(p)


def resolve_model_class(model_dir: Path, *, mmproj: bool = False, mistral_format: bool = False) -> type:
    """The upstream model class for this checkpoint; ModelInputError naming an unsupported architecture."""
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    model_type = ModelType.MMPROJ if mmproj else ModelType.TEXT
    try:
        hparams = ModelBase.load_hparams(model_dir, mistral_format)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ModelInputError(f"{model_dir}: cannot read the model config ({e}); check config.json") from None
    if mistral_format:
        if mmproj:
            from conversion.pixtral import PixtralModel
            return PixtralModel
        if hparams.get("moe") is not None:
            from conversion.mistral import MistralMoeModel
            return MistralMoeModel
        from conversion.mistral import MistralModel
        return MistralModel
    try:
        arch = get_model_architecture(hparams, model_type)
    except ValueError:
        raise ModelInputError(f"{model_dir}/config.json: no `architectures` entry; cannot tell which model this is") from None
    try:
        return get_model_class(arch, mmproj=mmproj)
    except NotImplementedError:
        raise ModelInputError(f"{model_dir}: architecture {arch!r} is not supported by llama.cpp's converter "
                              "(see --print-supported-models)") from None


# ------------------------------------------------------------------------------------------------ the hook
class _Deferred:
    """Stands in for upstream's quantized tensor: keeps the float source and the type upstream asked for."""

    __slots__ = ("source", "qtype")

    def __init__(self, source: Any, qtype: Any):
        self.source = source
        self.qtype = qtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def dtype(self) -> Any:
        return self.source.dtype


class _DropUpstreamTensorLines(logging.Filter):
    """Upstream logs '<name>, <dtype> --> F16, shape = ...' per tensor; with our hook that type is not the
    one written, so the converter logs its own line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (" --> " in msg and "shape = {" in msg)


class HookMixin:
    """Mixed in front of an upstream model class (see `hooked_class`)."""

    _sink: Sink | None
    _forced: dict[str, Any]

    def __init__(self, *args: Any, sink: Sink | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._forced = {}
        writer = self.gguf_writer  # type: ignore[attr-defined]
        self._writer_add_tensor = writer.add_tensor
        writer.add_tensor = self._intercept_add_tensor

    # upstream calls this once per emitted tensor, before its own F32 rules
    def tensor_force_quant(self, name: str, new_name: str, bid: int | None, n_dims: int) -> Any:
        forced = super().tensor_force_quant(name, new_name, bid, n_dims)  # type: ignore[misc]
        if forced is not False:
            self._forced[new_name] = forced
        return forced

    def prepare_tensors(self) -> None:
        gq = _gguf().quants
        original = gq.quantize
        upstream_logger = logging.getLogger("hf-to-gguf")
        flt = _DropUpstreamTensorLines()
        gq.quantize = lambda data, qtype: _Deferred(data, qtype)
        upstream_logger.addFilter(flt)
        try:
            super().prepare_tensors()  # type: ignore[misc]
        finally:
            gq.quantize = original
            upstream_logger.removeFilter(flt)

    def write_raw_tensor(self, name: str, data: Any, raw_dtype: Any = None, raw_shape: Any = None) -> None:
        """Forward a tensor (with its final type) to upstream's writer."""
        self._writer_add_tensor(name, data, raw_shape=raw_shape, raw_dtype=raw_dtype)

    def _intercept_add_tensor(self, name: str, tensor: Any, raw_shape: Any = None, raw_dtype: Any = None,
                              tensor_endianess: Any = None) -> None:
        gguf = _gguf()
        if tensor_endianess is not None:  # rare explicit endianness: leave it to upstream entirely
            self._writer_add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype,
                                    tensor_endianess=tensor_endianess)
            return
        forced = self._forced.pop(name, None)
        if isinstance(tensor, _Deferred):
            em = self._emitted(name, tensor.source, tensor.qtype, forced)
        elif isinstance(tensor, gguf.LazyChunkedTensor) and tensor._qtype in (
                gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            src = gguf.LazyChunkedTensor(tensor._chunks, tensor.shape, np.float32, None, tensor._byteswap)
            em = self._emitted(name, src, tensor._qtype, forced)
        else:
            # tensors model code adds itself (scales, repacked NVFP4/MXFP4 blocks): already final
            qt = raw_dtype if raw_dtype is not None else _float_qtype(tensor.dtype)
            shape = tuple(raw_shape) if raw_shape is not None else (
                tuple(gguf.quant_shape_from_byte_shape(tensor.shape, qt)) if np.dtype(tensor.dtype) == np.uint8
                and qt is not None and qt not in (gguf.GGMLQuantizationType.I8,) else tuple(tensor.shape))
            info = _make_info(name, shape, quantizable=False,
                              fixed_type=qt.name if qt is not None else str(tensor.dtype),
                              source_dtype=str(tensor.dtype))
            em = Emitted(info=info, data=tensor, upstream_type=qt, forced=forced, raw=True,
                         raw_dtype=raw_dtype, raw_shape=raw_shape)
        if self._sink is None:
            raise RuntimeError("hooked model has no sink")
        self._sink(self, em)

    def _arch_name(self) -> str | None:
        arch = getattr(self, "model_arch", None)
        return None if arch is None else _gguf().MODEL_ARCH_NAMES.get(arch)

    def _emitted(self, name: str, source: Any, upstream_type: Any, forced: Any) -> Emitted:
        T = _gguf().GGMLQuantizationType
        shape = tuple(int(d) for d in source.shape)
        if upstream_type == T.F32:
            quantizable, fixed = False, "F32"
        elif forced is not None and forced is not True:
            quantizable, fixed = False, T(forced).name
        elif allows_quantization(name, len(shape), self._arch_name()):
            quantizable, fixed = True, None
        else:
            quantizable, fixed = False, "F32"
        info = _make_info(name, shape, quantizable=quantizable, fixed_type=fixed, source_dtype=str(source.dtype))
        return Emitted(info=info, data=source, upstream_type=upstream_type, forced=forced)


def _float_qtype(dtype: Any) -> Any:
    T = _gguf().GGMLQuantizationType
    return {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16}.get(np.dtype(dtype))


def _make_info(name: str, shape: tuple[int, ...], *, quantizable: bool, fixed_type: str | None,
               source_dtype: str) -> TensorInfo:
    n = 1
    for d in shape:
        n *= int(d)
    return TensorInfo(name=name, shape=shape, n_params=n, cls=tensor_class(name), layer=layer_of(name),
                      quantizable=quantizable, fixed_type=fixed_type, source_dtype=source_dtype)


_HOOKED: dict[type, type] = {}


def hooked_class(model_class: type) -> type:
    """`model_class` with HookMixin in front (cached); upstream's registration is not touched."""
    if issubclass(model_class, HookMixin):
        return model_class
    if model_class not in _HOOKED:
        ns: dict[str, Any] = {"__module__": __name__}
        if hasattr(model_class, "model_arch"):
            ns["model_arch"] = model_class.model_arch  # TextModel.__init_subclass__ wants it in the class dict
        _HOOKED[model_class] = type(f"Hooked{model_class.__name__}", (HookMixin, model_class), ns)
    return _HOOKED[model_class]


def open_model(model_dir: Path, sink: Sink, *, fname_out: Path | None = None, mmproj: bool = False,
               mistral_format: bool = False, llama_cpp_dir: str | os.PathLike | None = None,
               model_class: type | None = None, **kwargs: Any) -> Any:
    """Instantiate the hooked upstream model for `model_dir` (lazy; nothing is read beyond headers)."""
    activate(llama_cpp_dir)
    model_dir = Path(model_dir)
    check_model_dir(model_dir, mistral_format)
    cls = hooked_class(model_class or resolve_model_class(model_dir, mmproj=mmproj, mistral_format=mistral_format))
    gguf = _gguf()
    try:
        return cls(model_dir, gguf.LlamaFileType.MOSTLY_F16, fname_out or model_dir, sink=sink, **kwargs)
    except ValueError as e:  # upstream's index checks: missing shards, weight map mismatch
        raise ModelInputError(f"{model_dir}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Upstream runs its transforms under torch.inference_mode; so do we when evaluating lazies."""
    import torch

    with torch.inference_mode():
        yield


def to_float32(data: Any) -> np.ndarray:
    """Evaluate a lazy float tensor (or pass an array through) as float32."""
    gguf = _gguf()
    if isinstance(data, gguf.LazyChunkedTensor):
        return np.concatenate([np.asarray(c(), dtype=np.float32).reshape(-1) for c in data._chunks]).reshape(data.shape)
    if isinstance(data, gguf.LazyNumpyTensor):
        data = gguf.LazyNumpyTensor.to_eager(data)
    return np.asarray(data, dtype=np.float32)


@dataclass
class Collector:
    """A sink that just records what was emitted (the catalog)."""

    items: list[Emitted] = field(default_factory=list)

    def __call__(self, model: Any, em: Emitted) -> None:
        self.items.append(em)
