"""Our own importance matrix from a Hugging Face checkpoint: torch forward passes over a calibration text with
hooks that sum the squared inputs of every matrix multiplication, keyed by the GGUF names the converter emits.

It follows llama-imatrix's protocol so the two are comparable: the text is tokenized once (with BOS when the
tokenizer adds one), cut into `ctx`-token chunks (at least 2 chunks' worth of tokens required, as llama-imatrix
demands), each chunk's first token replaced by BOS, every chunk evaluated independently; dense weights get one
count (tokens seen), MoE expert weights one count per expert (tokens routed to it); token_embd is never
collected and output.weight only on request. Why values are close but not bit-identical: docs/imatrix.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from measure.imatrix import ImatrixEntry, save_imatrix_gguf


class ImatrixComputeError(ValueError):
    """Bad input for computing an imatrix (text too short, unsupported model); one line naming the fix."""


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Acc:
    """float64 running sums of x^2 per column and per matrix (expert), plus token counts; with `cov`, also the
    whole X^T X (dense weights only: the input covariance error-compensated encoding needs)."""

    def __init__(self, n: int, n_mat: int = 1, cov: bool = False):
        self.sums = np.zeros((n_mat, n), dtype=np.float64)
        self.counts = np.zeros(n_mat, dtype=np.int64)
        self.cov = np.zeros((n, n), dtype=np.float64) if cov and n_mat == 1 else None

    def add(self, x, mat: int = 0) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sums[mat] += (x * x).sum(0).cpu().numpy()
        self.counts[mat] += x.shape[0]
        if self.cov is not None:
            self.cov += (x.T @ x).cpu().numpy()


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a model-dir problem for the user
        raise ImatrixComputeError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _tokenize(tok, text_path: Path) -> tuple[list[int], int | None]:
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    bos = tok.bos_token_id
    add_bos = bos is not None and bool(ids) and ids[0] == bos
    return ids, (bos if add_bos else None)


def _name_map(model_dir: Path):
    import json

    from catalog.hook import _gguf, resolve_model_class

    cls = resolve_model_class(model_dir)  # activates upstream's conversion + gguf first
    gguf = _gguf()

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_blocks = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0)
    return gguf.get_tensor_name_map(cls.model_arch, n_blocks)


def compute_imatrix(model_dir: str | os.PathLike, text: str | os.PathLike | Sequence[str | os.PathLike],
                    output: str | os.PathLike, *,
                    ctx: int = 512, chunks: int = -1, process_output: bool = False, device: str | None = None,
                    dataset_name: str | None = None, hessian_output: str | os.PathLike | None = None,
                    embedding_rows: int = 0) -> Path:
    """Compute and write a GGUF imatrix; returns its path. Raises ImatrixComputeError / catalog.ModelInputError.

    `text`: one calibration text or several; each gives up to `chunks` chunks (all of it when negative), so two
    texts of at least `chunks` chunks weigh the same. `hessian_output`: also write every dense weight's input
    covariance there (`measure.hessian`). `embedding_rows` > 0 (with `hessian_output`, a tied embedding only): also
    the statistics that give that many embedding rows a covariance of their own (`measure.embedding_rows`)."""
    import torch
    from transformers import AutoModelForCausalLM

    import catalog

    texts = [Path(text)] if isinstance(text, (str, os.PathLike)) else [Path(t) for t in text]
    model_dir, output = Path(model_dir), Path(output)
    if ctx < 16:
        raise ImatrixComputeError(f"--ctx {ctx} is too small; llama-imatrix ignores batches under 16 tokens")
    if not texts:
        raise ImatrixComputeError("no calibration text given; pass --text FILE")
    missing = [t for t in texts if not t.is_file()]
    if missing:
        raise ImatrixComputeError(f"{missing[0]}: calibration text not found")
    if embedding_rows and hessian_output is None:
        raise ImatrixComputeError("--embedding-rows is stored in the covariance file; pass --hessian FILE too")
    if embedding_rows < 0:
        raise ImatrixComputeError(f"--embedding-rows {embedding_rows}: give a number of rows >= 0")
    if chunks is not None and chunks == 0:
        raise ImatrixComputeError(f"--chunks {chunks}: nothing to compute")
    infos = {i.name: i for i in catalog.list_tensors(model_dir)}  # also validates the model dir
    if embedding_rows and ("output.weight" in infos or "token_embd.weight" not in infos):
        raise ImatrixComputeError(f"{model_dir}: --embedding-rows is for a tied embedding (no output.weight); "
                                  f"this model has its own output head, leave the option out")
    batches: list[list[int]] = []  # every chunk of every text, first token BOS when the tokenizer adds one
    tok = _load_tokenizer(model_dir)  # once for every text
    for t in texts:
        tokens, bos = _tokenize(tok, t)
        if len(tokens) < 2 * ctx:
            raise ImatrixComputeError(f"{t}: tokenizes to only {len(tokens)} tokens; a context of {ctx} needs at "
                                      f"least {2 * ctx} (use a longer text or a smaller --ctx)")
        n = len(tokens) // ctx if chunks is None or chunks < 0 else min(chunks, len(tokens) // ctx)
        for c in range(n):
            ids = list(tokens[c * ctx:(c + 1) * ctx])
            if bos is not None:
                ids[0] = bos
            batches.append(ids)
    n_chunk = len(batches)
    tmap = _name_map(model_dir)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to(dev).eval()

    accs: dict[str, _Acc] = {}
    head_cov: dict[str, _Acc] = {}  # covariance only: llama-imatrix leaves the head out unless asked
    hooks = []

    def gguf_name(module_name: str) -> str | None:
        n = tmap.get_name(module_name + ".weight", try_suffixes=(".weight",))
        return n if n in infos else None

    def dense_hook(name: str, n_in: int, into: dict[str, _Acc] = accs):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            if isinstance(x, torch.Tensor) and x.shape[-1] == n_in:
                into.setdefault(name, _Acc(n_in, cov=hessian_output is not None)).add(x)
        return hook

    def experts_hook(layer: int, mod):
        n_exp, two_i, hidden = mod.gate_up_proj.shape
        names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]

        def hook(_mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hs = hs.reshape(-1, hidden)
            for n in names[:2]:
                accs.setdefault(n, _Acc(hidden, n_exp))
            accs.setdefault(names[2], _Acc(two_i // 2, n_exp))
            for e in range(n_exp):
                tok = (idx == e).nonzero()[:, 0]
                if tok.numel() == 0:
                    continue
                x = hs[tok]
                for n in names[:2]:
                    accs[n].add(x, e)
                gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                accs[names[2]].add(mod.act_fn(gate) * up, e)
        return hook

    for mname, mod in model.named_modules():
        lm = _LAYER.search(mname)
        if hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and mod.gate_up_proj.ndim == 3:
            if lm is None:
                continue
            hooks.append(mod.register_forward_pre_hook(experts_hook(int(lm.group(1)), mod), with_kwargs=True))
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.ndim != 2 or isinstance(mod, torch.nn.Embedding):
            continue
        name = gguf_name(mname)
        if name is None or name.startswith("token_embd"):
            continue
        if not name.startswith("blk.") and not (process_output and name == "output.weight"):
            continue
        if infos[name].shape[-1] != w.shape[1]:
            continue  # the converter reshapes this one; importance per GGUF column is not the HF input column
        hooks.append(mod.register_forward_pre_hook(dense_hook(name, int(w.shape[1])), with_kwargs=True))

    if hessian_output is not None:  # the output head's input covariance too (never part of the imatrix itself)
        head = model.get_output_embeddings()
        head_name = "output.weight" if "output.weight" in infos else "token_embd.weight"  # tied: token_embd
        head_w = getattr(head, "weight", None)
        if (head_w is not None and head_w.ndim == 2 and head_name in infos
                and infos[head_name].shape[-1] == head_w.shape[1]
                and not (process_output and head_name == "output.weight")):  # else already hooked above
            hook = dense_hook(head_name, int(head_w.shape[1]), into=head_cov)
            hooks.append(head.register_forward_pre_hook(hook, with_kwargs=True))

    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if not accs:
        raise ImatrixComputeError(f"{model_dir}: no matrix multiplication could be mapped to a GGUF tensor name")
    row_stats = {}
    if embedding_rows:
        from measure.embedding_rows import EmbeddingRowsError, collect

        try:
            row_stats["token_embd.weight"] = collect(model, batches, embedding_rows)
        except EmbeddingRowsError as e:
            raise ImatrixComputeError(f"{model_dir}: {e}") from None
    entries = {n: ImatrixEntry(a.sums.astype(np.float32), a.counts.copy()) for n, a in accs.items()}
    if hessian_output is not None:
        from measure.hessian import save_hessians

        both = {**accs, **head_cov}
        covs = {n: a.cov for n, a in both.items() if a.cov is not None}
        save_hessians(hessian_output, covs, {n: int(both[n].counts[0]) for n in covs}, row_stats)
    return save_imatrix_gguf(output, entries, datasets=[dataset_name] if dataset_name else [str(t) for t in texts],
                             chunk_count=n_chunk,
                             chunk_size=ctx)
