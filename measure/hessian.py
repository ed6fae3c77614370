"""Input covariances (X^T X / tokens) of every dense matmul, the data behind error-compensated encoding.

An imatrix keeps only the diagonal of this matrix; `quants.compensate` needs the whole of it. Tensors that read
the same input (attn_q/k/v, ffn_gate/up) share one matrix in the file. Written by
`python -m measure imatrix ... --hessian FILE` (torch, `measure.imatrix_compute`).

File: safetensors, one float32 (K, K) tensor per distinct input named `cov.N`, and in the metadata the JSON map
`tensors` {GGUF tensor name: `cov.N`} and `tokens` (how many rows were summed). Optionally (`--embedding-rows`),
a tied embedding's per-row statistics (`measure.embedding_rows`): tensors `rows.N.*` and the metadata map
`rows` {GGUF tensor name: {"prefix": "rows.N", "n_rows": R}}. Those change only the converter's encoding of
that tensor, so they are not part of the fingerprint (measurement and probes use the shared matrix).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from measure.embedding_rows import FIELDS, EmbeddingRowStats

MAP_KEY = "tensors"
ROWS_KEY = "rows"


class HessianError(ValueError):
    """Unreadable or mismatched covariance file; one line naming the file and the fix."""


class Hessians:
    """Read lazily: a 1536 x 1536 matrix per ffn_down adds up to hundreds of MB for a whole model."""

    def __init__(self, path: Path, mapping: dict[str, str], tokens: int, rows: dict[str, dict] | None = None):
        self.path = Path(path)
        self.mapping = mapping
        self.tokens = tokens
        self.rows = rows or {}
        self._fingerprint: str | None = None
        self._cache: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.mapping

    def names(self) -> list[str]:
        return sorted(self.mapping)

    def check(self, names_and_inputs) -> None:
        """Raise HessianError if a covered tensor's matrix is not (n_in, n_in): shapes from the file's header,
        so validating a whole model before any work reads no matrix."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            for name, n_in in names_and_inputs:
                key = self.mapping.get(name)
                if key is not None:
                    self._check_shape(name, tuple(f.get_slice(key).get_shape()), n_in)
                if name in self.rows:
                    width = tuple(f.get_slice(f"{self.rows[name]['prefix']}.hidden").get_shape())[-1]
                    if width != n_in:
                        raise HessianError(f"{self.path}: embedding row statistics for {name} are {width} wide, "
                                           f"the tensor has {n_in} columns; the file was computed for another "
                                           f"model")

    def _check_shape(self, name: str, shape: tuple, n_in: int) -> None:
        if tuple(shape) != (n_in, n_in):
            raise HessianError(f"{self.path}: covariance for {name} is {'x'.join(map(str, shape))}, the tensor has "
                               f"{n_in} columns; the file was computed for another model")

    def for_tensor(self, name: str, n_in: int) -> np.ndarray | None:
        """The (n_in, n_in) covariance of the input of `name`, or None when the file has none for it."""
        key = self.mapping.get(name)
        if key is None:
            return None
        if key not in self._cache:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="numpy") as f:
                self._cache[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
        h = self._cache[key]
        self._check_shape(name, h.shape, n_in)
        return h

    def row_covariances(self, name: str, n_in: int):
        """`quants.compensate.RowCovariances` for `name` (a tied embedding collected with --embedding-rows), or
        None. Reads the statistics now: they are used once, by the converter."""
        entry = self.rows.get(name)
        shared = self.for_tensor(name, n_in) if entry is not None else None
        if shared is None:
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            stats = EmbeddingRowStats.from_tensors(f.get_tensor, entry["prefix"], entry["n_rows"])
        if stats.hidden.shape[1] != n_in:
            raise HessianError(f"{self.path}: embedding row statistics for {name} are {stats.hidden.shape[1]} wide, "
                               f"the tensor has {n_in} columns; the file was computed for another model")
        return stats.row_covariances(shared)

    def fingerprint(self) -> str:
        """Content hash (part of a measurement db's identity: other covariances, other bytes)."""
        if self._fingerprint is None:  # of the content, not the file: safetensors orders metadata keys at random
            from safetensors import safe_open

            h = hashlib.sha256(json.dumps(self.mapping, sort_keys=True).encode() + b"\0%d\0" % self.tokens)
            with safe_open(str(self.path), framework="numpy") as f:
                for key in sorted(set(self.mapping.values())):
                    h.update(key.encode() + b"\0")
                    h.update(np.ascontiguousarray(f.get_tensor(key), dtype="<f4").tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def load_hessians(path: str | os.PathLike) -> Hessians:
    path = Path(path)
    if not path.is_file():
        raise HessianError(f"{path}: covariance file not found (write one with "
                           f"`python -m measure imatrix MODEL --text T -o I.gguf --hessian {path.name}`)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise HessianError(f"{path}: not a readable covariance file ({type(e).__name__}: {e}); "
                           f"recompute it with `python -m measure imatrix ... --hessian`") from None
    try:
        mapping = json.loads(meta[MAP_KEY])
        tokens = int(meta.get("tokens", "0"))
        rows = json.loads(meta.get(ROWS_KEY, "{}"))
        row_keys = {f"{e['prefix']}.{k}" for e in rows.values() for k in FIELDS}
        for e in rows.values():
            int(e["n_rows"])
    except (KeyError, ValueError, TypeError):
        raise HessianError(f"{path}: no '{MAP_KEY}' map in its metadata, or a malformed '{ROWS_KEY}' map; not "
                           f"written by `python -m measure imatrix --hessian`") from None
    missing = sorted((set(mapping.values()) | row_keys) - keys)
    if missing:
        raise HessianError(f"{path}: map names {missing[0]} which the file lacks; the file is truncated or "
                           f"corrupt, recompute it")
    return Hessians(path, mapping, tokens, rows)


def save_hessians(path: str | os.PathLike, sums: dict[str, np.ndarray], tokens: dict[str, int],
                  row_stats: dict | None = None) -> Path:
    """Write {tensor name: X^T X} (each divided by its token count), one matrix per distinct input, and any
    {tensor name: measure.embedding_rows.EmbeddingRowStats}; temp + rename."""
    from safetensors.numpy import save_file

    path = Path(path)
    unique: dict[bytes, str] = {}
    tensors: dict[str, np.ndarray] = {}
    mapping: dict[str, str] = {}
    total = 0
    for name in sorted(sums):
        n = max(1, int(tokens[name]))
        total = max(total, n)
        m = np.ascontiguousarray(sums[name] / n, dtype=np.float32)
        digest = hashlib.sha1(m.tobytes()).digest()
        if digest not in unique:
            unique[digest] = f"cov.{len(unique)}"
            tensors[unique[digest]] = m
        mapping[name] = unique[digest]
    rows: dict[str, dict] = {}
    for i, (name, stats) in enumerate(sorted((row_stats or {}).items())):
        rows[name] = {"prefix": f"rows.{i}", "n_rows": int(stats.n_rows)}
        tensors.update(stats.tensors(f"rows.{i}"))
    meta = {MAP_KEY: json.dumps(mapping), "tokens": str(total)}
    if rows:
        meta[ROWS_KEY] = json.dumps(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
