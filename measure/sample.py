"""Text the model writes itself, as a second source for the input covariances.

Error compensation (`quants.compensate`) moves each weight's rounding error into the directions its input
covariance says are quiet. A covariance from one calibration text learns that text's quiet directions, and on
other text they are not quiet: on SmolLM2, with covariances from Moby-Dick, compensation halved the KLD on
held-out Moby-Dick but cut it by only 11% on licence texts (docs/quality.md, "The calibration domain"). Samples
drawn from the model cover what it was trained on without any other corpus. Each sample starts from the
tokenizer's BOS (when it adds one) and one random ordinary token, then is sampled at temperature 1.

    python -m measure sample MODEL_DIR -o samples.txt --tokens 20480
    python -m measure imatrix MODEL_DIR --text calibration.txt --text samples.txt --chunks 40 \
        -o mixed-imatrix.gguf --hessian covariances.safetensors
"""

from __future__ import annotations

import os
from pathlib import Path

from outputs import write_atomic


class SampleError(ValueError):
    """Bad options or an unusable model for sampling; one line naming the fix."""


def sample_text(model_dir: str | os.PathLike, output: str | os.PathLike, *, tokens: int = 20480, ctx: int = 512,
                seed: int = 0, temperature: float = 1.0, batch: int = 16, device: str | None = None,
                progress=None) -> Path:
    """Write ceil(tokens / ctx) samples of `ctx` tokens each (blank-line separated) to `output`, whole or not
    at all. Deterministic for a seed on one device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import catalog

    model_dir, output = Path(model_dir), Path(output)
    if tokens < 1 or ctx < 8 or batch < 1:
        raise SampleError(f"--tokens {tokens} / --ctx {ctx} / --batch {batch}: tokens and batch must be at least 1, "
                          f"ctx at least 8")
    if not temperature > 0:
        raise SampleError(f"--temperature {temperature}: must be above 0 (1 samples the model's own distribution)")
    catalog.list_tensors(model_dir)  # a usable checkpoint directory, or its one-line error
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a model-dir problem for the user
        raise SampleError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e}); sampling needs the "
                          f"checkpoint's tokenizer files") from None
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    if not ordinary:
        raise SampleError(f"{model_dir}: the tokenizer has no ordinary tokens to start a sample from")
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else None
    prefix = [] if bos is None else [bos]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_samples = -(-tokens // ctx)
    texts: list[str] = []
    with torch.inference_mode():
        for b0 in range(0, n_samples, batch):
            n = min(batch, n_samples - b0)
            first = torch.tensor(ordinary)[torch.randint(len(ordinary), (n,), generator=gen)]
            start = torch.cat([torch.tensor([prefix] * n, dtype=torch.long).reshape(n, len(prefix)),
                               first[:, None]], dim=1).to(dev)
            out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=ctx - start.shape[1],
                                 min_new_tokens=ctx - start.shape[1], pad_token_id=pad)
            texts += [tok.decode(row[len(prefix):], skip_special_tokens=True) for row in out.cpu()]
            if progress is not None:
                progress(b0 + n, n_samples)
    write_atomic(output, "\n\n".join(texts) + "\n")
    return output
