"""Pure-Python engine: read a GGUF with gguf-py, dequantize every tensor, run the model with torch.

A compact GGUF-native forward for the llama family as llama.cpp builds it (names, layouts and conventions
of the GGUF, not of the HF checkpoint): llama/mistral (adjacent-pair "normal" RoPE, because the converter
permutes attn_q/attn_k), mixtral (llama arch with experts: softmax router, top-k, weights renormalised),
qwen2 (NEOX RoPE, q/k/v bias), qwen3 (NEOX RoPE, per-head q/k RMSNorm), gemma (NEOX RoPE, GELU, embeddings
scaled by sqrt(n_embd), norm weights already shifted by +1 in the file). Needs no compiled llama.cpp.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from verify import VerifyError
from verify.kld import TokenStats, compare_logits, encode_logprobs, ppl_from_nll, summarize
from verify.logits_cache import BaseLogits, BaseLogitsWriter, scored_per_chunk

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma")
NEOX_ARCHS = ("qwen2", "qwen3", "gemma")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


@dataclass
class HParams:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: float
    rope_base: float
    rope_scale: float
    n_expert: int
    n_expert_used: int
    n_vocab: int
    add_bos: bool
    bos: int | None

    @classmethod
    def from_reader(cls, reader, path: Path) -> HParams:
        arch = _field(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise VerifyError(f"{path}: architecture {arch!r} is not supported by the torch engine "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)}); use --engine llamacpp")

        def g(key, default=None):
            v = _field(reader, f"{arch}.{key}", default)
            if v is None:
                raise VerifyError(f"{path}: GGUF metadata {arch}.{key} missing; re-convert the model")
            return v

        n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
        head_dim = int(g("attention.key_length", n_embd // n_head))
        scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
        scale = 1.0
        if scaling == "linear":
            scale = 1.0 / float(g("rope.scaling.factor"))
        elif scaling not in ("none", None):
            raise VerifyError(f"{path}: rope scaling {scaling!r} is not supported by the torch engine; "
                              f"use --engine llamacpp")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens.data) if tokens is not None else int(g("vocab_size"))
        add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
            add_bos = _field(reader, "tokenizer.ggml.model") == "llama"
        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        return cls(arch=arch, n_embd=n_embd, n_layer=int(g("block_count")), n_head=n_head,
                   n_head_kv=int(g("attention.head_count_kv", n_head)), head_dim=head_dim,
                   n_rot=int(g("rope.dimension_count", head_dim)),
                   eps=float(g("attention.layer_norm_rms_epsilon")), rope_base=float(g("rope.freq_base", 10000.0)),
                   rope_scale=scale, n_expert=int(g("expert_count", 0)), n_expert_used=int(g("expert_used_count", 0)),
                   n_vocab=n_vocab, add_bos=bool(add_bos), bos=None if bos is None else int(bos))


def read_gguf(path: Path):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise VerifyError(f"{path}: file not found")
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct errors/OSError for bad files
        raise VerifyError(f"{path}: not a readable GGUF ({type(e).__name__}: {e}); re-convert it") from None


def dequantize_tensor(t) -> np.ndarray:
    """A ReaderTensor -> float32 array in numpy order (ne reversed: rows last)."""
    from gguf import GGMLQuantizationType as Q

    import quants

    if t.tensor_type in (Q.F32, Q.F16):
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
    return arr.reshape(tuple(int(x) for x in reversed(t.shape)))


_Q8_K_ACT = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
             "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")
_Q8_0_ACT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4")


def _round_blocks(x: torch.Tensor, block: int, straight_through: bool = False) -> torch.Tensor:
    """Symmetric 8-bit rounding per block of `block` values (scale amax/127), back to float.

    straight_through: the forward value is the rounded one, the gradient passes as if unrounded (tune/)."""
    shape = x.shape
    if shape[-1] % block:
        return x
    b = x.reshape(-1, block)
    src = b.detach() if straight_through else b
    d = src.abs().amax(dim=1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(src / torch.where(d > 0, d, 1.0)), 0.0) * d
    return (b + (q - src) if straight_through else q).reshape(shape)


def ggml_activations(x: torch.Tensor, wtype, straight_through: bool = False) -> torch.Tensor:
    """ggml's CPU matmul converts the activations to the weight type's `vec_dot_type` first: Q8_K blocks of
    256 for K-quants, Q8_0 blocks of 32 for the legacy types, F16/BF16 for F16/BF16 weights. Emulating it
    brings our logits to llama.cpp's (mean KLD of a Q4_K_M within a few % instead of ~7% low)."""
    if wtype is None:
        return x
    name = wtype.name
    if name in _Q8_K_ACT:
        return _round_blocks(x, 256, straight_through)
    if name in _Q8_0_ACT:
        return _round_blocks(x, 32, straight_through)
    if name == "F16":
        return x.half().float()
    if name == "BF16":
        return x.bfloat16().float()
    return x


class GGUFModel:
    """Weights as float32 torch tensors keyed by GGUF tensor name, plus a forward pass."""

    def __init__(self, path: Path, threads: int | None = None, emulate_ggml: bool = True):
        self.path = Path(path)
        reader = read_gguf(self.path)
        self.hp = HParams.from_reader(reader, self.path)
        if threads:
            torch.set_num_threads(threads)
        self.qtypes = {t.name: t.tensor_type for t in reader.tensors}
        self.emulate_ggml = emulate_ggml
        self.straight_through = False  # gradients through the activation rounding (tune/ sets it)
        self.w: dict[str, torch.Tensor] = {}
        for t in reader.tensors:
            self.w[t.name] = torch.from_numpy(np.array(dequantize_tensor(t), dtype=np.float32, copy=True))
        if "token_embd.weight" not in self.w:
            raise VerifyError(f"{self.path}: no token_embd.weight tensor; not a complete model GGUF")
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- building blocks -------------------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.w[name]
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, self.hp.eps)

    def _in(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        """The activations as ggml's CPU matmul sees them for this weight's type (see `ggml_activations`)."""
        if not self.emulate_ggml:
            return x
        return ggml_activations(x, self.qtypes.get(weight), self.straight_through)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = self._in(x, name + ".weight") @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._rope_cache:
            hp = self.hp
            inv = hp.rope_base ** (-torch.arange(0, hp.n_rot, 2, dtype=torch.float64) / hp.n_rot)
            ff = self.w.get("rope_freqs.weight")
            if ff is not None:
                inv = inv / ff.to(torch.float64)
            ang = torch.arange(n, dtype=torch.float64)[:, None] * hp.rope_scale * inv[None, :]
            self._rope_cache[n] = (ang.cos().float(), ang.sin().float())
        return self._rope_cache[n]

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, D); rotate the first n_rot dims by position."""
        cos, sin = self._rope_tables(x.shape[1])
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        r = self.hp.n_rot
        rot, rest = x[..., :r], x[..., r:]
        if self.hp.arch in NEOX_ARCHS:
            a, b = rot[..., : r // 2], rot[..., r // 2:]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        else:  # adjacent pairs
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def _attention(self, x: torch.Tensor, i: int) -> torch.Tensor:
        hp, p = self.hp, f"blk.{i}."
        B, T, _ = x.shape
        q = self._linear(x, p + "attn_q").view(B, T, hp.n_head, hp.head_dim)
        k = self._linear(x, p + "attn_k").view(B, T, hp.n_head_kv, hp.head_dim)
        v = self._linear(x, p + "attn_v").view(B, T, hp.n_head_kv, -1)
        if p + "attn_q_norm.weight" in self.w:
            q = self._norm(q, p + "attn_q_norm.weight")
            k = self._norm(k, p + "attn_k_norm.weight")
        q, k = self._rope(q), self._rope(k)
        if self.emulate_ggml:  # llama.cpp keeps K and V in an F16 cache and takes dot products in F16
            q, k, v = (t.half().float() for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=1.0 / math.sqrt(hp.head_dim), enable_gqa=hp.n_head != hp.n_head_kv)
        return self._linear(o.transpose(1, 2).reshape(B, T, -1), p + "attn_output")

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.hp.arch == "gemma":
            return torch.nn.functional.gelu(x, approximate="tanh")
        return torch.nn.functional.silu(x)

    def _ffn(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"blk.{i}."
        if self.hp.n_expert == 0:
            return self._linear(self._act(self._linear(x, p + "ffn_gate")) * self._linear(x, p + "ffn_up"),
                                p + "ffn_down")
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(h @ self.w[p + "ffn_gate_inp.weight"].T, dim=-1)
        top_w, top_i = probs.topk(self.hp.n_expert_used, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        gate, up, down = (self.w[p + n] for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight",
                                                  "ffn_down_exps.weight"))
        out = torch.zeros_like(h)
        for e in range(self.hp.n_expert):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            he = h[rows]
            hq = self._in(he, p + "ffn_gate_exps.weight")
            mid = self._act(hq @ gate[e].T) * (self._in(he, p + "ffn_up_exps.weight") @ up[e].T)
            y = self._in(mid, p + "ffn_down_exps.weight") @ down[e].T
            out.index_add_(0, rows, y * top_w[rows, slot][:, None])
        return out.reshape(shape)

    # --- forward ---------------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.w["token_embd.weight"][tokens]
        if self.hp.arch == "gemma":
            x = x * math.sqrt(self.hp.n_embd)
        return x

    def layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = x + self._attention(self._norm(x, f"blk.{i}.attn_norm.weight"), i)
        return x + self._ffn(self._norm(x, f"blk.{i}.ffn_norm.weight"), i)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        name = "output.weight" if "output.weight" in self.w else "token_embd.weight"
        return self._in(self._norm(x, "output_norm.weight"), name) @ self.w[name].T

    @torch.inference_mode()
    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """tokens (T,) -> float32 logits (T - first, n_vocab) for positions first..T-1."""
        x = self.embed(torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None])
        for i in range(self.hp.n_layer):
            x = self.layer(x, i)
        return self.head(x[:, first:])[0].numpy()


def chunk_input(tokens: np.ndarray, hp: HParams) -> np.ndarray:
    """The chunk as llama-perplexity feeds it: first token replaced by BOS when the vocab adds one."""
    t = np.array(tokens, dtype=np.int32)
    if hp.add_bos and hp.bos is not None:
        t[0] = hp.bos
    return t


class TorchEngine:
    """Evaluates GGUFs with `GGUFModel`; same file formats and statistics as the llama.cpp engine."""

    name = "torch"

    def __init__(self, threads: int | None = None, model_dir: Path | None = None, verbose: bool = False,
                 emulate_ggml: bool = True):
        self.threads = threads or os.cpu_count()
        self.emulate_ggml = emulate_ggml
        self.model_dir = model_dir
        self.verbose = verbose

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"[torch] {msg}", flush=True)

    def run_base(self, base: Path, text: Path, n_ctx: int, n_chunks: int | None, out_raw: Path) -> dict:
        from verify.text import chunk_tokens, gguf_tokenizer, read_text

        model = GGUFModel(base, self.threads, self.emulate_ggml)
        encode = gguf_tokenizer(base, self.model_dir)
        toks = encode(read_text(text))
        chunks = chunk_tokens(toks, n_ctx, n_chunks, bos=model.hp.bos if model.hp.add_bos else None, source=text)
        writer = BaseLogitsWriter(out_raw, n_ctx, model.hp.n_vocab, chunks)
        first = n_ctx // 2
        nll = []
        t0 = time.time()
        for c in range(chunks.shape[0]):
            logits = model.logits(chunk_input(chunks[c], model.hp), first)[:-1]
            rows, chunk_nll = encode_logprobs(logits, chunks[c, first + 1:])
            writer.add_chunk(rows)
            nll.append(chunk_nll)
            self._log(f"base chunk {c + 1}/{chunks.shape[0]} {time.time() - t0:.1f}s")
        writer.close()
        m = ppl_from_nll(np.concatenate(nll))
        return {"ppl": m.ppl, "ppl_err": m.ppl_err, "n_chunk": int(chunks.shape[0]), "n_vocab": model.hp.n_vocab}

    def compare(self, model_path: Path, base_raw: Path, n_ctx: int, text: Path | None = None):
        base = BaseLogits.open(base_raw)
        model = GGUFModel(model_path, self.threads, self.emulate_ggml)
        return compare_model(model, base)


def compare_model(model: GGUFModel, base: BaseLogits, n_chunks: int | None = None):
    """Metrics of a loaded model against a base log-prob file (optionally its first n_chunks only)."""
    if model.hp.n_vocab != base.n_vocab:
        raise VerifyError(f"{model.path}: vocabulary of {model.hp.n_vocab} tokens, the base has {base.n_vocab}; "
                          f"compare only GGUFs of the same model")
    first = base.n_ctx // 2
    parts: list[TokenStats] = []
    n = base.n_chunk if n_chunks is None else min(n_chunks, base.n_chunk)
    for c in range(n):
        logits = model.logits(chunk_input(base.tokens[c], model.hp), first)[:-1]
        parts.append(compare_logits(logits, np.asarray(base.rows[c]), base.tokens[c, first + 1:]))
    assert parts[0].nll.size == scored_per_chunk(base.n_ctx)
    return summarize(TokenStats.concat(parts))
