"""Base log-probabilities on disk: llama.cpp's --kl-divergence-base file format, cached gzip-compressed.

File layout (what llama-perplexity writes and reads): b"_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk,
int32 tokens[n_chunk * n_ctx], then for each chunk (n_ctx - 1 - n_ctx//2) rows of `kld.row_width(n_vocab)`
uint16 (see `verify.kld`). Both engines write and read this one format, so the cache needs no conversion
and the llama.cpp engine can hand the file straight to llama-perplexity.

Cache entries are keyed by (sha256 of the base GGUF, sha256 of the text, n_ctx, chunks, engine).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from outputs import write_atomic
from verify import VerifyError
from verify.kld import row_width

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-strategy" / "verify"


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens scored per chunk: positions n_ctx//2 .. n_ctx-2 predict the second half of the chunk."""
    return n_ctx - 1 - n_ctx // 2


@dataclass
class BaseLogits:
    """A base log-prob file opened read-only (rows are memory-mapped)."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # (n_chunk, n_ctx) int32
    rows: np.ndarray  # (n_chunk, scored_per_chunk, row_width) uint16, memmap

    @classmethod
    def open(cls, path: Path) -> BaseLogits:
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise VerifyError(f"{path}: not a base log-prob file (llama-perplexity --kl-divergence-base format); "
                              f"delete it and re-run the base")
        _, n_ctx, n_vocab, n_chunk = HEADER.unpack(head)
        n_tok = n_ctx * n_chunk
        per = scored_per_chunk(n_ctx)
        expect = HEADER.size + 4 * n_tok + 2 * n_chunk * per * row_width(n_vocab)
        if path.stat().st_size != expect:
            raise VerifyError(f"{path}: truncated base log-prob file ({path.stat().st_size} bytes, expected "
                              f"{expect}); delete it and re-run the base")
        tokens = np.fromfile(path, dtype=np.int32, count=n_tok, offset=HEADER.size).reshape(n_chunk, n_ctx)
        rows = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER.size + 4 * n_tok,
                         shape=(n_chunk, per, row_width(n_vocab)))
        return cls(path, n_ctx, n_vocab, n_chunk, tokens, rows)


class BaseLogitsWriter:
    """Streams a base log-prob file chunk by chunk (to a temp name, renamed on close)."""

    def __init__(self, path: Path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        self.path = Path(path)
        self.n_ctx, self.n_vocab = n_ctx, n_vocab
        tokens = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1, n_ctx)
        self.n_chunk = tokens.shape[0]
        self._tmp = self.path.with_name(self.path.name + ".part")
        self._f = open(self._tmp, "wb")
        self._f.write(HEADER.pack(MAGIC, n_ctx, n_vocab, self.n_chunk))
        self._f.write(tokens.tobytes())
        self._written = 0

    def add_chunk(self, rows: np.ndarray) -> None:
        assert rows.shape == (scored_per_chunk(self.n_ctx), row_width(self.n_vocab)) and rows.dtype == np.uint16
        self._f.write(np.ascontiguousarray(rows).tobytes())
        self._written += 1

    def close(self) -> Path:
        self._f.close()
        if self._written != self.n_chunk:
            self._tmp.unlink(missing_ok=True)
            raise RuntimeError(f"base log-prob file incomplete: {self._written}/{self.n_chunk} chunks")
        os.replace(self._tmp, self.path)
        return self.path


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file, memoised by (real path, size, mtime) so multi-GB bases are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = (memo_dir or DEFAULT_CACHE_DIR) / "hashes.json"
    memo: dict[str, str] = {}
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        pass
    if memo_key in memo:
        return memo[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    memo[memo_key] = h.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_file, json.dumps(memo, indent=0))
    except OSError:
        pass
    return memo[memo_key]


class LogitsCache:
    """Directory of compressed base log-prob files plus a JSON sidecar (base PPL, provenance)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else DEFAULT_CACHE_DIR
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, base: Path, text_hash: str, n_ctx: int, n_chunks: int | None, engine: str) -> str:
        parts = [file_sha256(base, self.root), text_hash, str(n_ctx), str(n_chunks or -1), engine]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.kld.gz", self.root / f"{key}.json"

    def meta(self, key: str) -> dict | None:
        data, side = self._paths(key)
        if not (data.is_file() and side.is_file()):
            return None
        try:
            return json.loads(side.read_text())
        except ValueError:
            return None

    def store(self, key: str, raw_file: Path, meta: dict) -> None:
        """Compress raw_file into the cache (temp name + rename), then write the sidecar."""
        data, side = self._paths(key)
        tmp = data.with_name(data.name + f".{os.getpid()}.part")
        with open(raw_file, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, data)
        write_atomic(side, json.dumps({**meta, "created": time.time()}, indent=1))

    @contextmanager
    def open_raw(self, key: str) -> Iterator[Path]:
        """The uncompressed file in a temp dir for the duration of the block (llama-perplexity reads it raw)."""
        data, _ = self._paths(key)
        with tempfile.TemporaryDirectory(prefix="verify-base-") as td:
            raw = Path(td) / "base.kld"
            try:
                with gzip.open(data, "rb") as src, open(raw, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except (OSError, EOFError) as e:
                data.unlink(missing_ok=True)
                raise VerifyError(f"{data}: corrupt cache entry ({e}); it was deleted, re-run to rebuild it") from e
            yield raw
