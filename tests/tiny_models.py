"""Tiny but real Hugging Face checkpoints for tests: generated config, seeded random weights, and a
SentencePiece tokenizer trained on the bundled calibration text (llama.cpp converts SentencePiece vocabularies
for llama, qwen2/3, mixtral and gemma without needing a known BPE pre-tokenizer hash; qwen2moe/qwen3moe only
take a BPE tokenizer whose hash llama.cpp knows, so mixtral is the MoE here).

Shapes are chosen so every K-quant applies (rows of 256); pass `hidden_size=320` etc. to exercise fallbacks.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
EVALUATION_TEXT = DATA_DIR / "evaluation.txt"

VOCAB_SIZE = 512

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 64}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("GemmaConfig", {"head_dim": 64, "tie_word_embeddings": True}),
}


def train_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE, text_file: Path = CALIBRATION_TEXT) -> None:
    """A byte-fallback SentencePiece BPE model (tokenizer.model) plus its HF tokenizer.json."""
    import sentencepiece as spm

    buf = io.BytesIO()
    lines = [ln for ln in text_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1, minloglevel=2, normalization_rule_name="identity",
    )
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 1024,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    try:  # tokenizer.json lets transformers load it without protobuf; conversion needs protobuf once
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))
    except Exception:  # noqa: BLE001 - tokenizer.model alone is enough for llama.cpp
        pass


def make_tiny_model(arch: str, out_dir: Path, *, seed: int = 0, dtype: str = "bfloat16",
                    **overrides: Any) -> Path:
    """Write a tiny `arch` checkpoint (config.json, model.safetensors, tokenizer) into out_dir."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS)}")
    cls_name, extra = ARCHS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # break the symmetry of default init: norms and biases are not all ones/zeros
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
    model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    train_tokenizer(out_dir, vocab_size=kwargs["vocab_size"])
    return out_dir


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny HF checkpoint for tests and the README example.")
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_model(args.arch, args.out, seed=args.seed))


def convert_upstream(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """HF dir -> GGUF with upstream convert_hf_to_gguf.py (the reference conversion)."""
    from llamacpp.upstream import find_sources

    src = find_sources()
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    res = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                          "--outfile", str(out)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return out
