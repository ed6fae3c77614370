"""Exact GGUF byte accounting: what a plan's file will weigh before it is written.

Why exact: a budget of "2.5 GiB" must never be exceeded, and the budget allocator spends the last megabytes
greedily, so an estimate that is off by the F32 norms or the tokenizer would silently break the promise.

A GGUF file (v3, as gguf-py and llama-quantize write it) is

    header        magic(4) version(4) n_tensors(8) n_kv(8)                 = 24 bytes
    kv            the metadata key/values (tokenizer vocab dominates)       = metadata_bytes
    tensor infos  per tensor: name(8 + len) n_dims(4) dims(8 each) type(4) offset(8)
    padding       to `alignment` (general.alignment, 32 by default)
    data          each tensor's bytes, each padded to `alignment`

so file size = pad(24 + kv + infos) + sum_i pad(data_i), which is separable per tensor: the allocators work on
padded per-tensor sizes plus a fixed overhead (header, kv, infos and every tensor whose type is not chosen).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ALIGNMENT = 32
HEADER_BYTES = 24


class SizeError(ValueError):
    """A size string or model description that cannot be used; the message says how to fix it."""


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _qtype(name: str | GGMLQuantizationType) -> GGMLQuantizationType:
    if isinstance(name, GGMLQuantizationType):
        return name
    try:
        return GGMLQuantizationType[str(name).strip().upper()]
    except KeyError:
        raise SizeError(f"unknown GGUF type {name!r}") from None


def bits_per_weight(qtype: str | GGMLQuantizationType) -> float:
    """Nominal bits per weight of a type (block bytes * 8 / block size): Q4_K -> 4.5, Q8_0 -> 8.5."""
    bs, ts = GGML_QUANT_SIZES[_qtype(qtype)]
    return ts * 8 / bs


def fits_row(qtype: str | GGMLQuantizationType, n_per_row: int) -> bool:
    """Can rows of `n_per_row` values be stored in this type without llama-quantize's shape fallback?"""
    return n_per_row % GGML_QUANT_SIZES[_qtype(qtype)][0] == 0


def tensor_data_bytes(qtype: str | GGMLQuantizationType, shape: Iterable[int]) -> int:
    """Unpadded bytes of a tensor of `shape` (GGUF layout, rows last) stored as `qtype`."""
    shape = tuple(int(s) for s in shape)
    bs, ts = GGML_QUANT_SIZES[_qtype(qtype)]
    n_per_row = shape[-1] if shape else 1
    if n_per_row % bs:
        raise SizeError(f"rows of {n_per_row} values do not fit {_qtype(qtype).name} blocks of {bs}")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    return n_rows * (n_per_row // bs) * ts


def tensor_info_bytes(name: str, n_dims: int) -> int:
    return 8 + len(name.encode("utf-8")) + 4 + 8 * n_dims + 4 + 8


@dataclass(frozen=True)
class TensorMeta:
    """What byte accounting and constraints need to know about one tensor of the converted model."""

    name: str
    shape: tuple[int, ...]
    cls: str = ""
    layer: int | None = None
    quantizable: bool = True
    fixed_type: str | None = None   # the type written when not quantizable (F32 norms, ...)

    @property
    def n_params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def n_per_row(self) -> int:
        return self.shape[-1] if self.shape else 1

    @classmethod
    def from_info(cls, info) -> TensorMeta:
        """From a `catalog.TensorInfo` (duck-typed so this module does not import the converter)."""
        return cls(name=info.name, shape=tuple(int(s) for s in info.shape), cls=info.cls, layer=info.layer,
                   quantizable=bool(info.quantizable), fixed_type=info.fixed_type)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "cls": self.cls, "layer": self.layer,
                "quantizable": self.quantizable, "fixed_type": self.fixed_type}

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorMeta:
        return cls(name=d["name"], shape=tuple(d["shape"]), cls=d.get("cls", ""), layer=d.get("layer"),
                   quantizable=bool(d.get("quantizable", True)), fixed_type=d.get("fixed_type"))


def padded_bytes(qtype: str, shape: Iterable[int], align: int = ALIGNMENT) -> int:
    return pad(tensor_data_bytes(qtype, shape), align)


def overhead_bytes(metas: Iterable[TensorMeta], metadata_bytes: int, chosen: Iterable[str],
                   default_type: str = "F16", align: int = ALIGNMENT) -> int:
    """Bytes of the file that do not depend on the types of the `chosen` tensors.

    Header, kv, tensor infos, the alignment padding after them, and the (padded) data of every tensor not in
    `chosen` (non-quantizable ones at their fixed type; any other unchosen one at `default_type`).
    """
    chosen = set(chosen)
    metas = list(metas)
    infos = sum(tensor_info_bytes(m.name, len(m.shape)) for m in metas)
    total = pad(HEADER_BYTES + int(metadata_bytes) + infos, align)
    for m in metas:
        if m.name in chosen:
            continue
        t = m.fixed_type if not m.quantizable and m.fixed_type else default_type
        total += padded_bytes(t, m.shape, align)
    return total


def file_size(metas: Iterable[TensorMeta], types: Mapping[str, str], metadata_bytes: int,
              default_type: str = "F16", align: int = ALIGNMENT) -> int:
    """Exact size of the GGUF file when tensor `name` is stored as `types[name]`."""
    metas = list(metas)
    total = overhead_bytes(metas, metadata_bytes, types.keys(), default_type, align)
    by_name = {m.name: m for m in metas}
    for name, t in types.items():
        total += padded_bytes(t, by_name[name].shape, align)
    return total


# ------------------------------------------------------------------------------------------------ metadata
def metadata_bytes_from_gguf(path: str | Path) -> int:
    """Exact kv-section bytes of an existing GGUF of the same model (e.g. the F16 conversion)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    if r.tensors:
        kv = int(min(t.field.offset for t in r.tensors)) - HEADER_BYTES
    else:  # no tensors: the kv section runs to the end of the last field
        kv = max(int(f.offset) + sum(int(p.nbytes) for p in f.parts) for f in r.fields.values()) - HEADER_BYTES
    # keys our converter writes per plan are accounted by strategy_kv_bytes, not here
    for key in STRATEGY_KEYS:
        f = r.fields.get(key)
        if f is not None:
            kv -= sum(int(p.nbytes) for p in f.parts)
    return kv


# kv entries convert_hf_to_gguf_strategy.py adds when it writes a plan (plan digest, plan file name)
STRATEGY_KEYS = ("quantize.strategy.sha256", "quantize.strategy.file")


def strategy_kv_bytes(plan_file_name: str | None) -> int:
    """Bytes of the kv entries the converter adds for a plan: key (8 + len) + type (4) + string (8 + len).

    The digest is 64 hex characters; the file name is the plan's base name, cut to 127 characters (as the
    converter writes it). Without a name we reserve the longest possible one, so the budget still holds.
    """
    digest = 8 + len(STRATEGY_KEYS[0]) + 4 + 8 + 64
    name_len = len(plan_file_name.encode("utf-8")[:127]) if plan_file_name is not None else 127
    return digest + 8 + len(STRATEGY_KEYS[1]) + 4 + 8 + name_len


def estimate_metadata_bytes(model_dir: str | Path) -> int:
    """Upper-side estimate of the kv section from the tokenizer files, for budgets before any GGUF exists.

    The vocabulary dominates: per token a string (8 + len) and a type (4), plus a score (4) except for a pure
    BPE vocabulary (llama.cpp's gpt2-style vocab has no scores array: counting one put SmolLM2's estimate 192 KiB
    high); BPE merges are strings too. Model hyper-parameters, chat template and the rest are a few KiB; we add
    16 KiB + the template length so the estimate errs on the side of not exceeding the budget.
    """
    model_dir = Path(model_dir)
    total = 16384
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        vocab = model.get("vocab") or {}
        # a tokenizer.model means the converter may take the SentencePiece path, which writes scores
        scores = model.get("type") != "BPE" or (model_dir / "tokenizer.model").is_file()
        items = vocab.keys() if isinstance(vocab, Mapping) else [v[0] if isinstance(v, list) else str(v) for v in vocab]
        for t in items:
            total += 8 + len(str(t).encode("utf-8")) + 4 + (4 if scores else 0)
        for a in data.get("added_tokens") or []:
            total += 8 + len(str(a.get("content", "")).encode("utf-8")) + 8
        for m in model.get("merges") or []:
            s = m if isinstance(m, str) else " ".join(m)
            total += 8 + len(s.encode("utf-8"))
    else:
        sp = model_dir / "tokenizer.model"
        if sp.is_file():
            total += sp.stat().st_size  # pieces + scores, roughly the same bytes as the GGUF arrays
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") or ""
        except (json.JSONDecodeError, AttributeError):
            tmpl = ""
        total += len(str(tmpl).encode("utf-8")) + 64
    return total


# ------------------------------------------------------------------------------------------------ parsing
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int | float) -> int:
    """'2.5GiB' -> 2684354560; '900MB' -> 900000000; '123456' -> 123456 bytes. K/M/G alone mean KiB/MiB/GiB."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise SizeError(f"cannot read size {text!r}; write e.g. 2.5GiB, 900MiB, 1.2GB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit, f in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= f:
            return f"{n / f:.3f} {unit}"
    return f"{n} B"
