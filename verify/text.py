"""Evaluation text -> token chunks, as llama-perplexity splits it.

llama-perplexity tokenizes the whole file once (BOS first when the vocabulary asks for one), cuts it into
floor(n_tokens / n_ctx) chunks of n_ctx tokens (at most --chunks), and replaces the first token of each
chunk by BOS. The torch engine tokenizes with the GGUF's own vocabulary through transformers' GGUF
tokenizer loader (or the HF checkpoint's tokenizer), which matches llama.cpp's tokens on our tests.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from verify import VerifyError


def read_text(path: Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VerifyError(f"{path}: text file not found; pass an existing UTF-8 text with --text") from None
    except UnicodeDecodeError as e:
        raise VerifyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def text_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def gguf_tokenizer(gguf_path: Path, model_dir: Path | None = None) -> Callable[[str], list[int]]:
    """text -> token ids without special tokens, from the GGUF's vocabulary (or model_dir's tokenizer)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    gguf_path = Path(gguf_path)
    if model_dir is None:
        try:  # transformers' GGUF vocabulary converter, called directly: it needs no model-architecture support
            from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

            arch, tok_dict, _ = get_gguf_tokenizer(str(gguf_path))
            backend, _ = convert_gguf_tokenizer(arch, tok_dict)
            return lambda text: list(backend.encode(text, add_special_tokens=False).ids)
        except Exception:  # noqa: BLE001 - older transformers: fall back to AutoTokenizer(gguf_file=...)
            pass
    try:
        if model_dir is not None:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one line
        where = model_dir or gguf_path
        raise VerifyError(f"{where}: cannot build a tokenizer ({type(e).__name__}: {e}); "
                          f"pass --model-dir with the HF checkpoint or use --engine llamacpp") from None

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    return encode


def chunk_tokens(tokens: list[int] | np.ndarray, n_ctx: int, n_chunks: int | None, *, bos: int | None,
                 source: Path | str = "text") -> np.ndarray:
    """(n_chunk, n_ctx) int32 tokens; a text shorter than 2 chunks is a one-line error, as in llama.cpp."""
    toks = np.asarray(tokens, dtype=np.int32)
    if bos is not None:
        toks = np.concatenate([np.array([bos], dtype=np.int32), toks])
    if toks.size < 2 * n_ctx:
        raise VerifyError(f"{source}: tokenizes to only {toks.size} tokens; perplexity needs at least "
                          f"{2 * n_ctx} (2 chunks of --ctx {n_ctx}); use a longer text or a smaller --ctx")
    n = toks.size // n_ctx
    if n_chunks is not None and n_chunks > 0:
        n = min(n, n_chunks)
    return toks[: n * n_ctx].reshape(n, n_ctx)
