"""Activation smoothing: an exact reparametrisation of the checkpoint that makes llama.cpp's 8-bit activation
rounding cheaper (SmoothQuant, Xiao et al. 2022; the same folding AWQ checkpoints use).

llama.cpp's CPU matmuls round their inputs to 8 bits per block (Q8_0 blocks of 32 for the legacy types, Q8_K
blocks of 256 for K-quants). A few channels of each matmul input are 10-20x larger than the rest (SmolLM2), so
every block holding one rounds its other channels coarsely; on SmolLM2 that rounding alone costs 0.0035 mean
KLD (4 x 512 tokens), as much as a Q6_K-size file's weight error. Dividing input channel j by s_j and
multiplying weight column j by s_j leaves every product unchanged, and the division can be folded into the
tensor that produces the input:

- attention input: `input_layernorm` weight / s, columns of q/k/v_proj * s
- FFN input: `post_attention_layernorm` weight / s, columns of gate/up_proj * s
- down_proj input (silu(gate) * up): rows of up_proj / s, columns of down_proj * s

s_j = rms_j^alpha / max|W_:j|^(1 - alpha), with rms_j from the imatrix (its values are mean x_j^2), normalised
to a geometric mean of 1. A tied output head is left alone (its
columns are the embedding's, which the lookup reads too); an untied one is smoothed through the final norm when
the imatrix covers it (llama-imatrix --process-output).
alpha 0.5 halved the rounding's KLD (0.0035 -> 0.0018) and lowered a Q5_1-everywhere model's KLD by 7% with
the imatrix (docs/quality.md). The imatrix is transformed with the model (mean (x/s)^2 = imatrix / s^2), so a
plan, a measurement db and a converted file of the smoothed checkpoint use the same statistics as the stock
mixes of the original, rescaled.

The smoothed checkpoint is a normal HF directory: every later stage (imatrix, covariances, measure, strategy,
convert) reads it unchanged. Changed tensors are stored as float32 (a BF16 copy would round them). Tensors are
read and written one at a time, so a 70B checkpoint smooths in a few GB of memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from measure.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix_gguf
from outputs import at_destination, is_disk_full

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_ALPHA = 0.5
FORMAT = 1  # bump when the transform's output changes (caches of smoothed checkpoints are keyed by it)
INFO_FILE = "smoothing.json"


class SmoothError(ValueError):
    """Unsupported model or inconsistent input; one line naming the file and the fix."""


@dataclass(frozen=True)
class Site:
    """One matmul input: the tensor producing it (scaled down) and the tensors reading it (scaled up)."""

    producer: str               # HF name: a norm weight (1-D) or up_proj (rows are the channels)
    readers: tuple[str, ...]    # HF names of weights whose columns are the channels
    imatrix_names: tuple[str, ...]  # GGUF names of the readers (imatrix keys)


@dataclass
class SmoothReport:
    out_dir: Path
    imatrix_out: Path
    alpha: float
    sites: int
    skipped: list[str] = field(default_factory=list)


def sites_for(n_layer: int, untied_head: bool = False) -> list[Site]:
    """Every smoothable input; the head's only when it has its own weight (else its columns are the embedding's)."""
    out = []
    for i in range(n_layer):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        out.append(Site(p + "input_layernorm.weight",
                        tuple(p + f"self_attn.{k}_proj.weight" for k in "qkv"),
                        tuple(g + f"attn_{k}.weight" for k in "qkv")))
        out.append(Site(p + "post_attention_layernorm.weight",
                        (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                        (g + "ffn_gate.weight", g + "ffn_up.weight")))
        out.append(Site(p + "mlp.up_proj.weight", (p + "mlp.down_proj.weight",), (g + "ffn_down.weight",)))
    if untied_head:  # llama-imatrix collects output.weight only with --process-output; skipped without
        out.append(Site("model.norm.weight", ("lm_head.weight",), ("output.weight",)))
    return out


def smooth_scales(rms: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel divisor of the activations (float64, geometric mean 1). Channels never activated keep 1."""
    rms = np.asarray(rms, dtype=np.float64)
    wmax = np.asarray(weight_absmax, dtype=np.float64)
    live = (rms > 0) & (wmax > 0)
    s = np.ones_like(rms)
    if not live.any():
        return s
    s[live] = rms[live] ** alpha / wmax[live] ** (1.0 - alpha)
    s[live] /= np.exp(np.log(s[live]).mean())
    return np.clip(s, 1e-3, 1e3)


class _Checkpoint:
    """The checkpoint's safetensors files, read one tensor at a time (a 70B checkpoint never fits in memory)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.files = sorted(model_dir.glob("*.safetensors"))
        if not self.files:
            raise SmoothError(f"{model_dir}: no *.safetensors files; smoothing reads safetensors checkpoints")
        self._open = {f: safe_open(str(f), framework="pt") for f in self.files}  # headers checked by the caller
        self.where = {k: f for f, h in self._open.items() for k in h.keys()}
        self.headers = {f: _read_header(f) for f in self.files}

    def get(self, name: str):
        """As torch (BF16 has no numpy dtype)."""
        return self._open[self.where[name]].get_tensor(name)

    def raw(self, name: str) -> bytes:
        """The stored bytes, unchanged (copying a tensor that smoothing leaves alone)."""
        f = self.where[name]
        data_start, entries = self.headers[f]
        b, e = entries[name]["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(data_start + b)
            return fh.read(e - b)


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: header entry}) of a safetensors file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _write_safetensors(path: Path, items: list[tuple[str, str, list[int], int]], produce) -> None:
    """A safetensors file written tensor by tensor: `items` (name, dtype, shape, nbytes) fix the header up front,
    `produce(name)` returns each tensor's bytes in turn, so only one tensor is in memory at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, _, _, nbytes in items:
            data = produce(name)
            if len(data) != nbytes:  # pragma: no cover - an internal inconsistency, not a user error
                raise AssertionError(f"{name}: {len(data)} bytes, header says {nbytes}")
            fh.write(data)


def check_smoothable(model_dir: Path, out_dir: Path, alpha: float) -> tuple[dict, int, str]:
    """(config, n_layer, architecture) after every check that needs no tensor read: run first, so a user error
    ends in one line before any long work (the channel order's forward pass included)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not 0.0 < alpha < 1.0:
        raise SmoothError(f"--alpha {alpha}: use a value between 0 and 1 (0.5 is SmoothQuant's balance)")
    from catalog.hook import check_model_dir

    check_model_dir(model_dir)  # a directory with config.json and readable, complete safetensors (one-line errors)
    cfg_path = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        n_layer = int(cfg["num_hidden_layers"])
    except (ValueError, KeyError, TypeError):
        raise SmoothError(f"{cfg_path}: not a readable model config (no num_hidden_layers); re-download it") from None
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise SmoothError(f"{cfg_path}: architecture {arch} is not supported by smoothing (dense llama-style "
                          f"models only: {', '.join(SUPPORTED)}); convert the checkpoint without smoothing")
    if out_dir.resolve() == model_dir.resolve():
        raise SmoothError(f"{out_dir}: the output directory must differ from the checkpoint")
    if out_dir.exists() and not (out_dir / INFO_FILE).is_file():
        raise SmoothError(f"{out_dir}: exists and is not a smoothed checkpoint; choose another -o")
    return cfg, n_layer, arch


def smooth_checkpoint(model_dir: str | os.PathLike, imatrix: str | os.PathLike, out_dir: str | os.PathLike,
                      imatrix_out: str | os.PathLike, *, alpha: float = DEFAULT_ALPHA,
                      order: np.ndarray | None = None) -> SmoothReport:
    """Write the smoothed checkpoint to `out_dir` (whole, or not at all) and the matching imatrix.

    Two passes over the tensors, one at a time: the scales (column maxima of the readers), then each output file
    streamed tensor by tensor. Peak memory is about one tensor in float64, whatever the model's size.

    `order` (new position -> old channel, `measure.permute.choose_order`) also permutes the hidden channels,
    after smoothing; it changes no product either."""
    import torch

    model_dir, out_dir, imatrix_out = Path(model_dir), Path(out_dir), Path(imatrix_out)
    cfg, n_layer, arch = check_smoothable(model_dir, out_dir, alpha)
    im: Imatrix = load_imatrix(imatrix)
    ckpt = _Checkpoint(model_dir)

    # pass 1: every site's scales, from the original tensors (no site reads a tensor another site changed)
    columns: dict[str, np.ndarray] = {}   # reader -> multiplier of its columns
    divisors: dict[str, np.ndarray] = {}  # producer -> divisor of its rows (or of a 1-D norm weight)
    entries = dict(im.entries)
    skipped: list[str] = []
    n_sites = 0
    untied = not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in ckpt.where
    for site in sites_for(n_layer, untied):
        names = [site.producer, *site.readers]
        missing = [n for n in names if n not in ckpt.where]
        if missing:
            raise SmoothError(f"{model_dir}: tensor {missing[0]} not found; is this a {arch} checkpoint?")
        key = next((n for n in site.imatrix_names if n in im.entries), None)
        if key is None or im.entries[key].counts.size != 1:
            skipped.append(site.producer)
            continue
        importance = im.entries[key].values().astype(np.float64)
        wmax = None
        for n in site.readers:
            r = ckpt.get(n).float()
            if r.shape[1] != importance.size:
                raise SmoothError(f"{imatrix}: entry {key} has {importance.size} values but {n} has "
                                  f"{r.shape[1]} columns; the imatrix is for another model")
            m = r.abs().amax(dim=0).double().numpy()
            wmax = m if wmax is None else np.maximum(wmax, m)
        s = smooth_scales(np.sqrt(importance), wmax, alpha)
        for n in site.readers:
            columns[n] = s
        divisors[site.producer] = s
        for n in site.imatrix_names:
            e = entries.get(n)
            if e is not None and e.counts.size == 1 and e.sums.size == s.size:
                sums = (e.sums.reshape(-1).astype(np.float64) / (s * s)).astype(np.float32)
                entries[n] = ImatrixEntry(sums.reshape(e.sums.shape), e.counts.copy(), legacy=e.legacy)
        n_sites += 1
    if n_sites == 0:
        raise SmoothError(f"{imatrix}: no entry for any attention or FFN input of this model; pass the model's "
                          f"imatrix (python -m measure imatrix or llama-imatrix)")

    hidden_cols, hidden_rows = _hidden_tensors(n_layer, ckpt.where)
    perm = None
    if order is not None:
        order = np.asarray(order, dtype=np.int64)
        k = ckpt.get("model.norm.weight").shape[0]
        if order.shape != (k,) or not np.array_equal(np.sort(order), np.arange(k)):
            raise SmoothError(f"channel order: not a permutation of the {k} hidden channels of {model_dir}")
        perm = torch.from_numpy(order)
        for n in _IMATRIX_HIDDEN:
            for i in range(n_layer):
                _permute_entry(entries, f"blk.{i}.{n}", order)
        _permute_entry(entries, "output.weight", order)

    def smoothed_bytes(name: str) -> bytes:
        moved = perm is not None and (name in hidden_cols or name in hidden_rows)
        if name not in columns and name not in divisors and not moved:
            return ckpt.raw(name)
        t = ckpt.get(name)
        if name in columns or name in divisors:
            t = t.float()
        if name in columns:  # columns first, then rows, each rounded to float32 (up_proj takes both)
            t = (t.double() * torch.from_numpy(columns[name])[None, :]).float()
        if name in divisors:
            d = torch.from_numpy(divisors[name])
            t = (t.double() / d[:, None] if t.ndim == 2 else t.double() / d).float()
        if moved:  # exact in any dtype: a permuted tensor that smoothing left alone keeps its dtype
            t = t[:, perm] if name in hidden_cols else t[perm]
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != INFO_FILE:
                shutil.copy2(f, tmp / f.name)
        index = tmp / "model.safetensors.index.json"
        if index.exists():  # sizes change (float32): keep the map, drop the stale total
            idx = json.loads(index.read_text())
            idx.get("metadata", {}).pop("total_size", None)
            index.write_text(json.dumps(idx, indent=2))
        for f in ckpt.files:  # changed tensors become float32 (a BF16 copy would round them)
            items = []
            for n, e in ckpt.headers[f][1].items():
                changed = n in columns or n in divisors
                nbytes = 4 * int(np.prod(e["shape"])) if changed else e["data_offsets"][1] - e["data_offsets"][0]
                items.append((n, "F32" if changed else e["dtype"], e["shape"], nbytes))
            _write_safetensors(tmp / f.name, sorted(items), smoothed_bytes)
        for f in tmp.iterdir():  # mkdtemp makes 0700: as any file the user writes
            os.chmod(f, 0o666 & ~umask)
        (tmp / INFO_FILE).write_text(json.dumps({
            "method": "smoothquant", "alpha": alpha, "source": str(model_dir), "imatrix": str(imatrix),
            "imatrix_out": str(imatrix_out), "sites": n_sites, "skipped": skipped,
            "imatrix_check": _pairing_record(im, entries),
            "channel_order": None if order is None else [int(x) for x in order]}, indent=1))
        save_imatrix_gguf(imatrix_out, Imatrix(entries, datasets=list(im.datasets), chunk_count=im.chunk_count,
                                               chunk_size=im.chunk_size))
        if out_dir.exists():  # a previous smoothed checkpoint (checked above): replaced
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) and e.filename != str(imatrix_out):  # a copy names its source, not the disk that filled
            raise at_destination(e, out_dir) from e
        raise
    return SmoothReport(out_dir, imatrix_out, alpha, n_sites, skipped)


_IMATRIX_HIDDEN = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")


def _hidden_tensors(n_layer: int, present) -> tuple[set[str], set[str]]:
    """HF names whose columns are hidden channels, and those whose rows (or values, 1-D) are."""
    cols = {"model.embed_tokens.weight", "lm_head.weight"}
    rows = {"model.norm.weight"}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        cols.update(p + f"self_attn.{k}_proj.weight" for k in "qkv")
        cols.update(p + f"mlp.{k}_proj.weight" for k in ("gate", "up"))
        rows.update(p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                    "self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight",
                                    "mlp.down_proj.bias"))
    return cols & set(present), rows & set(present)


def _permute_entry(entries: dict[str, ImatrixEntry], name: str, order: np.ndarray) -> None:
    e = entries.get(name)
    if e is not None and e.counts.size == 1 and e.sums.size == order.size:
        entries[name] = ImatrixEntry(e.sums.reshape(-1)[order].reshape(e.sums.shape), e.counts.copy(),
                                     legacy=e.legacy)


def _entry_total(im: Imatrix | dict, name: str) -> float | None:
    entries = im.entries if isinstance(im, Imatrix) else im
    e = entries.get(name)
    return None if e is None else float(np.asarray(e.values(), dtype=np.float64).sum())


def _pairing_record(original: Imatrix, smoothed: dict[str, ImatrixEntry]) -> dict | None:
    """One imatrix entry's total before and after rescaling: enough to tell the two files apart later."""
    for name in sorted(original.entries):
        a, b = _entry_total(original, name), _entry_total(smoothed, name)
        if a is not None and b is not None and abs(a - b) > 1e-3 * max(abs(a), abs(b)):
            return {"entry": name, "original": a, "smoothed": b}
    return None


def check_imatrix_pairing(model_dir: str | os.PathLike, imatrix: Imatrix, imatrix_path: str | os.PathLike) -> None:
    """Raise SmoothError when `model_dir` is a smoothed checkpoint and `imatrix` is the original's: its statistics
    are off by s^2 per channel, so measurements, plans and the converted file would weight the wrong channels.
    A no-op for an ordinary checkpoint or an imatrix computed afresh on the smoothed one."""
    info_path = Path(model_dir) / INFO_FILE
    if not info_path.is_file():
        return
    try:
        rec = json.loads(info_path.read_text()).get("imatrix_check")
        name, orig, smoothed = rec["entry"], float(rec["original"]), float(rec["smoothed"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return  # written before the record existed, or hand-edited: nothing to compare against
    total = _entry_total(imatrix, name)
    if total is None:
        return
    if abs(total - orig) <= 1e-5 * abs(orig) and abs(total - smoothed) > 1e-5 * abs(smoothed):
        raise SmoothError(f"{imatrix_path}: is the imatrix of the checkpoint before smoothing, but {model_dir} is "
                          f"smoothed; pass the --imatrix-out file `measure smooth` wrote with it, or compute a new "
                          f"imatrix on {model_dir}")
