"""Calibration probes: KLD of the model with some tensors replaced by their quantize->dequantize round trip,
against the base's log-probs, without writing a GGUF.

    session = ProbeSession("/tmp/smollm2", text, n_ctx=512, n_chunks=4)   # HF dir or base GGUF; loads once
    r = session.probe({"blk.3.ffn_down.weight": "q4_k"}, importance={"blk.3.ffn_down.weight": vec})
    r.kld_mean, r.metrics.kld_p99, r.seconds

The session keeps the dequantized base weights and, per chunk, the hidden state entering every layer, so
a probe only re-runs the layers from the first replaced tensor on (a probe of blk.20 runs 10 of 30 layers;
output.weight alone runs just the head). Round-tripped tensors are memoised per (name, type, importance).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import quants
from verify import VerifyError
from verify.kld import Metrics, TokenStats, compare_logits, encode_logprobs, ppl_from_nll, summarize
from verify.logits_cache import DEFAULT_CACHE_DIR
from verify.text import chunk_tokens, gguf_tokenizer, read_text
from verify.torch_engine import GGUFModel, chunk_input

_BLK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class ProbeResult:
    metrics: Metrics
    seconds: float
    quantize_seconds: float
    start_layer: int
    replaced: dict[str, str] = field(default_factory=dict)

    @property
    def kld_mean(self) -> float:
        return float(self.metrics.kld_mean or 0.0)


def _dir_fingerprint(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def gguf_for_model_dir(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """An unquantized GGUF of an HF checkpoint (llama.cpp's converter, --outtype auto), made once and cached."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise VerifyError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint directory or a GGUF")
    out_dir = (Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR) / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{model_dir.name}-{_dir_fingerprint(model_dir)}.gguf"
    if out.is_file():
        return out
    from llamacpp.upstream import find_sources

    src = find_sources()
    tmp = out.with_name(out.name + f".{os.getpid()}.part")
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    res = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "auto",
                          "--outfile", str(tmp)], capture_output=True, text=True, env=env)
    if res.returncode != 0 or not tmp.is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()
        raise VerifyError(f"{model_dir}: conversion to GGUF failed: {tail[-1] if tail else 'no output'}")
    os.replace(tmp, out)
    return out


def layer_of(name: str, n_layer: int) -> int:
    """First layer whose input a tensor changes: blk.N -> N, the head (output*) -> n_layer, else 0."""
    m = _BLK.match(name)
    if m:
        return int(m.group(1))
    if name.startswith("output"):
        return n_layer
    return 0


class ProbeSession:
    """A base model loaded once, with its log-probs and per-layer hidden states on `n_chunks` chunks of text.

    `model` is an HF checkpoint directory (converted once by llama.cpp's converter, cached) or a GGUF."""

    def __init__(self, model: Path | str, text: Path | str, *, n_ctx: int = 512, n_chunks: int = 4,
                 threads: int | None = None, cache_dir: Path | None = None, batch: int = 4,
                 emulate_ggml: bool = False, verbose: bool = False, hessians: Any = None, skip_chunks: int = 0):
        t0 = time.time()
        model = Path(model)
        model_dir = model if model.is_dir() else None
        self.gguf = gguf_for_model_dir(model, cache_dir) if model_dir else model
        if threads:
            torch.set_num_threads(threads)
        # emulate_ggml (llama.cpp's 8-bit activation rounding) roughly doubles the forward's cost and adds the
        # same noise floor to every probe; off by default, so a probe measures the weights' round trip alone
        self.model = GGUFModel(self.gguf, emulate_ggml=emulate_ggml)
        self.n_ctx, self.first, self.batch = n_ctx, n_ctx // 2, max(1, batch)
        hp = self.model.hp
        toks = gguf_tokenizer(self.gguf)(read_text(Path(text)))
        # skip_chunks: the chunks after another session's (a judge must not read the text its candidates were fitted on)
        tokens = chunk_tokens(toks, n_ctx, n_chunks + skip_chunks if n_chunks else None,
                              bos=hp.bos if hp.add_bos else None, source=text)
        if len(tokens) <= skip_chunks:
            raise VerifyError(f"{text}: {len(tokens)} chunks of {n_ctx} tokens, none left after the first {skip_chunks}; "
                              f"use a longer text")
        self.tokens = tokens[skip_chunks:]
        self.inputs = torch.from_numpy(np.stack([chunk_input(t, hp) for t in self.tokens]).astype(np.int64))
        self.originals = dict(self.model.w)
        self.original_types = dict(self.model.qtypes)
        self._memo: dict[tuple, torch.Tensor] = {}
        # measure.hessian.Hessians (anything with for_tensor(name, n_in)): round trips use the error-compensated
        # encoding the converter writes with the same covariance file
        self.hessians = hessians
        # one pass over the base: hidden state entering each layer (index n_layer = final), and the base rows
        self.hidden: list[list[torch.Tensor]] = []
        rows, nll = [], []
        with torch.inference_mode():
            for b0 in range(0, len(self.tokens), self.batch):
                x = self.model.embed(self.inputs[b0:b0 + self.batch])
                states = [x]
                for i in range(hp.n_layer):
                    x = self.model.layer(x, i)
                    states.append(x)
                self.hidden.append(states)
                logits = self.model.head(x[:, self.first:-1]).numpy()
                for j in range(logits.shape[0]):
                    r, n = encode_logprobs(logits[j], self.tokens[b0 + j, self.first + 1:])
                    rows.append(r)
                    nll.append(n)
        self.base_rows = rows
        self.base_ppl = ppl_from_nll(np.concatenate(nll))
        self.setup_seconds = time.time() - t0
        if verbose:
            print(f"probe session: {self.gguf.name}, {len(self.tokens)}x{n_ctx} tokens, base PPL "
                  f"{self.base_ppl.ppl:.4f}, ready in {self.setup_seconds:.1f}s", flush=True)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.originals)

    def _replacement(self, name: str, qtype: str, importance: np.ndarray | None) -> torch.Tensor:
        key = (name, str(qtype).lower(), None if importance is None else hashlib.sha1(
            np.ascontiguousarray(importance, dtype=np.float32).tobytes()).hexdigest())
        if key not in self._memo:
            w = self.originals[name].numpy()
            h = self.hessians.for_tensor(name, w.shape[-1]) if self.hessians is not None and w.ndim == 2 else None
            self._memo[key] = torch.from_numpy(np.ascontiguousarray(
                quants.round_trip(w, qtype, importance, name=name, hessian=h)))
        return self._memo[key]

    def clear_memo(self) -> None:
        """Drop memoised round-tripped tensors (they cost as much memory as the weights they replace)."""
        self._memo.clear()

    def probe(self, replace: Mapping[str, str], importance: Mapping[str, np.ndarray] | None = None,
              n_chunks: int | None = None, from_layer: int | None = None) -> ProbeResult:
        """Metrics with `replace` = {gguf tensor name: type} swapped in; weights restored afterwards.

        from_layer forces where the forward restarts (default: the first layer a replaced tensor changes)."""
        t0 = time.time()
        unknown = [n for n in replace if n not in self.originals]
        if unknown:
            raise VerifyError(f"unknown tensor(s) {', '.join(unknown[:3])} in probe; names are GGUF tensor names "
                              f"such as {next(iter(self.originals))}")
        for name, qtype in replace.items():
            imp = None if importance is None else importance.get(name)
            self.model.w[name] = self._replacement(name, qtype, imp)
            self.model.qtypes[name] = quants.parse_type(qtype)
        tq = time.time() - t0
        hp = self.model.hp
        start = min((layer_of(n, hp.n_layer) for n in replace), default=hp.n_layer)
        if from_layer is not None:
            start = max(0, min(from_layer, start))
        parts: list[TokenStats] = []
        n_use = len(self.tokens) if n_chunks is None else min(n_chunks, len(self.tokens))
        try:
            with torch.inference_mode():
                for bi, b0 in enumerate(range(0, n_use, self.batch)):
                    b1 = min(b0 + self.batch, n_use)
                    x = (self.model.embed(self.inputs[b0:b1]) if start == 0
                         else self.hidden[bi][start][: b1 - b0])
                    for i in range(start, hp.n_layer):
                        x = self.model.layer(x, i)
                    logits = self.model.head(x[:, self.first:-1]).numpy()
                    for j in range(b1 - b0):
                        parts.append(compare_logits(logits[j], self.base_rows[b0 + j],
                                                    self.tokens[b0 + j, self.first + 1:]))
        finally:
            self.model.w.update({n: self.originals[n] for n in replace})
            self.model.qtypes.update({n: self.original_types[n] for n in replace})
        return ProbeResult(summarize(TokenStats.concat(parts)), time.time() - t0, tq, start,
                           {k: str(v) for k, v in replace.items()})
