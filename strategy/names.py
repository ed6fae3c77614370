"""Tensor-name helpers (class, layer) without importing the converter: allocators must load fast."""

from __future__ import annotations

import re

_BLK = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def tensor_class(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd' (same as catalog.tensor_class)."""
    base = _BLK.sub("", name)
    return base[: -len(".weight")] if base.endswith(".weight") else base
