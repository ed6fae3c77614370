"""The tuning loop: KL(base || quantized) on calibration chunks, Adam on relative changes of the float fields.

Parametrisation: a block scale becomes d0 * (1 + u) and a minimum m0 + d0 * v, a norm vector g0 * (1 + u), with
u = v = 0 at the start. Adam's steps are then relative to each field's own size, so one learning rate suits
blocks of 1e-4 and norm weights of 3. The loss is the mean per-token KL over positions >= `first` of each chunk,
the quantized forward rounding its matmul inputs as llama.cpp's CPU backend does (gradients straight through).
Memory: about three float32 copies of the model plus the activations of one batch; a small-model tool on CPU.

Codes (`what` with "codes"): each weight's level code becomes a float rank p, rounded in the forward pass and
passed straight through in the backward one (a = s * T[round(p)], gradient as if a = s * T'(p) * p). Adam with
`code_lr` (in ranks per step) moves p from the code's own rank; a code changes only once its rank has moved half a
level, so a small code_lr flips just the weights whose gradient keeps its sign. Another float copy of the model,
and Adam's two, on top; the written file keeps every type and size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune import TuneError
from tune.fields import BlockFields, levels_by_rank, split, tunable, with_fields

WHAT = ("scales", "norms", "codes")
DEFAULT_WHAT = ("scales", "norms")


@dataclass
class TuneResult:
    out: Path
    steps: int
    best_step: int
    codes_changed: int
    val_before: float
    val_best: float
    train_chunks: int
    val_chunks: int
    tensors: int
    parameters: int
    seconds: float

    def line(self) -> str:
        gain = (self.val_best - self.val_before) / self.val_before if self.val_before > 0 else 0.0
        codes = f", {self.codes_changed:,} codes changed" if self.codes_changed else ""
        return (f"tuned {self.tensors} tensors ({self.parameters:,} parameters) for {self.steps} steps; held-out KL "
                f"{self.val_before:.5f} -> {self.val_best:.5f} ({gain:+.1%}, best at step {self.best_step}, "
                f"{self.val_chunks} chunks{codes}); wrote {self.out} in {self.seconds:.0f}s")


def _chunks(gguf_path: Path, texts: Sequence[Path], ctx: int, per_text: Sequence[int], hp) -> np.ndarray:
    from verify import VerifyError
    from verify.text import chunk_tokens, gguf_tokenizer, read_text
    from verify.torch_engine import chunk_input

    encode = gguf_tokenizer(gguf_path)
    out = []
    for t, n in zip(texts, per_text):
        try:
            toks = chunk_tokens(encode(read_text(Path(t))), ctx, n, bos=hp.bos if hp.add_bos else None,
                                source=t)
        except VerifyError as e:
            raise TuneError(str(e)) from None
        out.extend(chunk_input(c, hp) for c in toks)
    return np.stack(out).astype(np.int64)


def _rank_offsets(f: BlockFields, values: torch.Tensor, float_w: torch.Tensor) -> torch.Tensor:
    """Where each float weight sits between its code's neighbouring levels, in ranks, kept inside the code's own
    rounding interval: codes whose float weight lies near a level boundary are the first to flip, one by one as
    their offsets cross it, not all after the same number of equal Adam steps."""
    rank = torch.from_numpy(f.rank.astype(np.float32))
    unit = torch.from_numpy(f.d)[..., None] * (1.0 if f.s is None else torch.from_numpy(f.s))
    w = float_w.reshape(f.rank.shape)
    if f.c is not None:
        w = w - torch.from_numpy(f.c) * torch.from_numpy(f.m)[..., None]
    level = torch.where(unit != 0, w / torch.where(unit != 0, unit, 1), values[rank.long()])
    lo, hi = values[:-1], values[1:]
    j = torch.searchsorted(values, level.contiguous()).clamp(1, len(values) - 1)  # level in [values[j-1], values[j]]
    pos = (j - 1) + ((level - lo[j - 1]) / (hi[j - 1] - lo[j - 1])).clamp(0, 1)
    off = pos - rank
    # a float weight outside its code's interval: the code was chosen by error compensation (or is clipped), and
    # where the float weight lies says nothing about which neighbour is closer to a flip
    return torch.where(off.abs() <= 0.5, off.clamp(-0.49, 0.49), torch.zeros_like(off))


def _check_pair(qm, bm, quant: Path, base: Path) -> None:
    for key in ("n_vocab", "n_embd", "n_layer"):
        if getattr(qm.hp, key) != getattr(bm.hp, key):
            raise TuneError(f"{base}: {key} {getattr(bm.hp, key)} differs from {quant}'s {getattr(qm.hp, key)}; "
                            f"pass the float model the quantized file was converted from")
    for name, w in qm.w.items():
        other = bm.w.get(name)
        if other is None or tuple(other.shape) != tuple(w.shape):
            raise TuneError(f"{base}: tensor {name} is missing or has another shape than in {quant}; pass the float "
                            f"model the quantized file was converted from (the same smoothed checkpoint, if any)")


def _as_stored(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 as the file stores it, the gradient passed straight through.

    A step of lr 1e-4 is a fifth of an fp16 ulp: without this, held-out KL was measured on values the written
    file does not hold (SmolLM2 Q5_K_M: 0.01011 in memory, 0.01022 from the written file)."""
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


def tune_gguf(quant: Path, base: Path, texts: Sequence[Path], out: Path, *, steps: int = 60, lr: float = 1e-4,
              ctx: int = 512, chunks: int | Sequence[int] = 40, val_chunks: int = 8, batch: int = 2,
              what: Sequence[str] = DEFAULT_WHAT, code_lr: float = 0.003,
              eval_every: int = 15, seed: int = 0, threads: int | None = None,
              log: Callable[[str], None] = print) -> TuneResult:
    """Tune `quant` against the float `base` GGUF on up to `chunks` chunks of each text (one count for all, or
    one per text); write `out`."""
    from verify import VerifyError
    from verify.torch_engine import GGUFModel, read_gguf

    t0 = time.time()
    quant, base, out = Path(quant), Path(base), Path(out)
    bad = [w for w in what if w not in WHAT]
    if bad or not what:
        raise TuneError(f"--what {','.join(what)}: choose from {', '.join(WHAT)}")
    if steps < 0 or lr <= 0 or code_lr <= 0 or batch < 1 or val_chunks < 1 or ctx < 8:
        raise TuneError("need --steps >= 0, --lr > 0, --code-lr > 0, --batch >= 1, --val-chunks >= 1 and --ctx >= 8")
    if threads:
        torch.set_num_threads(threads)
    try:
        qm = GGUFModel(quant, emulate_ggml=True)
        bm = GGUFModel(base, emulate_ggml=False)
    except VerifyError as e:
        raise TuneError(str(e)) from None
    _check_pair(qm, bm, quant, base)
    qm.straight_through = True
    hp = qm.hp
    per_text = [chunks] * len(texts) if isinstance(chunks, int) else list(chunks)
    if len(per_text) != len(texts):
        raise TuneError(f"{len(per_text)} chunk counts for {len(texts)} texts: give one count, or one per text")
    data = _chunks(quant, texts, ctx, per_text, hp)
    if len(data) < val_chunks + 1:
        raise TuneError(f"{len(data)} chunks of {ctx} tokens from {len(texts)} text(s): need more than --val-chunks "
                        f"{val_chunks}; give longer texts or lower --val-chunks")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    val, train = torch.from_numpy(data[order[:val_chunks].numpy()]), torch.from_numpy(data[order[val_chunks:].numpy()])
    first = min(32, ctx // 4)

    # parameters: relative changes of every tunable block field and norm vector
    reader = read_gguf(quant)
    fields: dict[str, tuple[BlockFields, torch.Tensor, torch.Tensor | None]] = {}
    norms: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
    for t in reader.tensors:
        if ("scales" in what or "codes" in what) and len(t.shape) == 2 and tunable(t.tensor_type):
            f = split(np.asarray(t.data), t.tensor_type, codes="codes" in what)
            fields[t.name] = (f, torch.from_numpy(f.a), None if f.c is None else torch.from_numpy(f.c))
            if "scales" in what:
                deltas[t.name + "#d"] = torch.zeros(f.d.shape, requires_grad=True)
                if f.c is not None:
                    deltas[t.name + "#m"] = torch.zeros(f.d.shape, requires_grad=True)
            if f.rank is not None:
                values = torch.from_numpy(levels_by_rank(t.tensor_type))
                lo, hi = torch.cat([values[:1], values[:-1]]), torch.cat([values[1:], values[-1:]])
                slope = (hi - lo) / torch.tensor([1.0] + [2.0] * (len(values) - 2) + [1.0])
                ranks[t.name] = (torch.from_numpy(f.rank.astype(np.float32)),
                                 None if f.s is None else torch.from_numpy(f.s), values, slope)
                deltas[t.name + "#p"] = _rank_offsets(f, values, bm.w[t.name]).requires_grad_(True)
        elif "norms" in what and t.name.endswith("norm.weight") and t.tensor_type.name == "F32":
            norms[t.name] = qm.w[t.name].clone()
            deltas[t.name] = torch.zeros_like(norms[t.name], requires_grad=True)
    if not deltas:
        raise TuneError(f"{quant}: no tunable tensors ({', '.join(what)}); tunable block types: scales of "
                        f"Q4_0..Q8_0, IQ4_NL/XS and the K-quants")
    d0 = {n: torch.from_numpy(f.d) for n, (f, _, _) in fields.items()}
    m0 = {n: torch.from_numpy(f.m) for n, (f, _, _) in fields.items() if f.m is not None}

    def rank_of(n: str) -> torch.Tensor:
        return (ranks[n][0] + deltas[n + "#p"].detach()).round().clamp(0, len(ranks[n][2]) - 1)

    def unit_codes(n: str) -> torch.Tensor:
        """a = s * T[round(p)], its gradient passed straight through the rounding."""
        _, s_unit, values, slope = ranks[n]
        p = deltas[n + "#p"]
        idx = rank_of(n).long()
        a = values[idx] + slope[idx] * (p - p.detach())
        return a if s_unit is None else a * s_unit

    def apply() -> None:
        for n, (_, a, c) in fields.items():
            if n in ranks:
                a = unit_codes(n)
            d = _as_stored(d0[n] * (1 + deltas[n + "#d"])) if n + "#d" in deltas else d0[n]
            w = a * d[..., None]
            if c is not None:
                m = _as_stored(m0[n] + d0[n] * deltas[n + "#m"]) if n + "#m" in deltas else m0[n]
                w = w + c * m[..., None]
            qm.w[n] = w.reshape(qm.w[n].shape)
        for n, g in norms.items():
            qm.w[n] = g * (1 + deltas[n])

    def logits(m, x: torch.Tensor) -> torch.Tensor:
        h = m.embed(x)
        for i in range(hp.n_layer):
            h = m.layer(h, i)
        return torch.log_softmax(m.head(h[:, first:]), dim=-1)

    def kl(x: torch.Tensor, lb: torch.Tensor | None = None) -> torch.Tensor:
        if lb is None:
            with torch.no_grad():
                lb = logits(bm, x)
        return (lb.exp() * (lb - logits(qm, x))).sum(-1).mean()

    val_batches = [val[i:i + batch] for i in range(0, len(val), batch)]
    val_base: list[torch.Tensor] = []  # the base's log-probs on the held-out chunks, computed once

    def val_kl() -> float:
        with torch.no_grad():
            if not val_base:
                val_base.extend(logits(bm, x) for x in val_batches)
            apply()
            parts = [float(kl(x, lb)) * len(x) for x, lb in zip(val_batches, val_base)]
        return sum(parts) / len(val)

    params = list(deltas.values())
    is_code = [k.endswith("#p") for k in deltas]
    groups = [{"params": [p for p, c in zip(params, is_code) if c == code], "lr": code_lr if code else lr}
              for code in (False, True)]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    before = best = val_kl()
    best_step, best_state = 0, [p.detach().clone() for p in params]
    log(f"tune: {len(fields)} block tensors, {len(norms)} norms, {sum(p.numel() for p in params):,} parameters "
        f"({', '.join(what)}); "
        f"{len(train)} training and {len(val)} held-out chunks of {ctx}; held-out KL {before:.5f}")

    def changed() -> int:
        return sum(int((rank_of(n) != ranks[n][0]).sum()) for n in ranks)

    t_loop = time.time()
    for step in range(1, steps + 1):
        idx = [(step - 1) * batch + j for j in range(batch)]
        x = train[[i % len(train) for i in idx]]
        apply()
        loss = kl(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            v = val_kl()
            spent = time.time() - t_loop
            moved = f", {changed():,} codes changed" if ranks else ""
            log(f"tune: step {step}/{steps} training KL {float(loss.detach()):.5f}, held-out {v:.5f}{moved} "
                f"({time.time() - t0:.0f}s, ETA {spent / step * (steps - step):.0f}s)")
            if v < best:
                best, best_step, best_state = v, step, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, best_state):
            p.copy_(s)
    n_changed = changed() if ranks else 0
    _write(reader, out, fields, deltas, d0, m0, norms, {n: rank_of(n) for n in ranks})
    return TuneResult(out, steps, best_step, n_changed, before, best, len(train), len(val),
                      len(fields) + len(norms), sum(p.numel() for p in params), time.time() - t0)


def _write(reader, out: Path, fields, deltas, d0, m0, norms, ranks: dict[str, torch.Tensor]) -> None:
    import gguf

    from outputs import atomic_path

    new: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for n, (f, _, _) in fields.items():
            d = (d0[n] * (1 + deltas[n + "#d"])).numpy() if n + "#d" in deltas else f.d
            m = (m0[n] + d0[n] * deltas[n + "#m"]).numpy() if n + "#m" in deltas else f.m
            rank = ranks[n].numpy().astype(np.int64) if n in ranks else None
            t = next(t for t in reader.tensors if t.name == n)
            new[n] = with_fields(np.asarray(t.data), t.tensor_type, d, m, name=n, rank=rank)
        for n, g in norms.items():
            new[n] = (g * (1 + deltas[n])).numpy().astype(np.float32)
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vt = f.types[0]
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
        for t in reader.tensors:
            w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            data = new.get(t.name)
            w.write_tensor_data(t.data if data is None else data.reshape(t.data.shape))
        w.close()
