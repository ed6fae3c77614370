"""Orchestration: base log-probs (cached), candidates, uniform and stock reference quants, one result list.

`run_pipeline` is what the CLI and benchmarks/bench_quality.py call.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verify import VerifyError
from verify.kld import Metrics
from verify.logits_cache import LogitsCache
from verify.text import text_sha256

ROOT = Path(__file__).resolve().parent.parent
UNIFORM_TYPES = ("q8_0", "q6_k", "q4_k")
STOCK_MIXES = ("Q5_K_M", "Q4_K_M", "Q3_K_M")


@dataclass
class Entry:
    """One evaluated GGUF: its group decides the chart series ('base', 'ours', 'uniform', 'stock')."""

    label: str
    path: str
    group: str
    size_mib: float
    bpw: float
    metrics: Metrics
    seconds: float = 0.0

    def row(self) -> dict:
        return {"label": self.label, "group": self.group, "path": self.path, "size_mib": self.size_mib,
                "bpw": self.bpw, "seconds": self.seconds, **self.metrics.to_dict()}


@dataclass
class Report:
    base: Entry
    entries: list[Entry] = field(default_factory=list)
    engine: str = ""
    n_ctx: int = 0
    n_chunk: int = 0
    text: str = ""


def gguf_size(path: Path) -> tuple[float, float]:
    """(file size in MiB, bits per weight over the tensor data) of a GGUF."""
    from verify.torch_engine import read_gguf

    reader = read_gguf(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_el = sum(int(t.n_elements) for t in reader.tensors)
    return Path(path).stat().st_size / 2**20, (8.0 * n_bytes / n_el if n_el else 0.0)


def vocab_fingerprint(path: Path) -> tuple[int, str] | None:
    """(n_tokens, sha256 of the token strings) or None when gguf-py cannot read the file."""
    from gguf import GGUFReader

    try:
        f = GGUFReader(path).fields.get("tokenizer.ggml.tokens")
    except Exception:  # noqa: BLE001 - unreadable files are reported by the engine with its own message
        return None
    if f is None:
        return None
    h = hashlib.sha256()
    for i in f.data:
        h.update(f.parts[i].tobytes())
        h.update(b"\0")
    return len(f.data), h.hexdigest()


def make_engine(name: str = "auto", *, llama_cpp: str | None = None, threads: int | None = None,
                model_dir: Path | None = None, verbose: bool = False):
    from verify.llamacpp_engine import LlamaCppEngine
    from verify.torch_engine import TorchEngine

    if name == "llamacpp":
        return LlamaCppEngine(llama_cpp, threads, verbose)
    if name == "torch":
        return TorchEngine(threads, model_dir, verbose)
    if name != "auto":
        raise VerifyError(f"unknown engine {name!r}; choose llamacpp, torch or auto")
    try:
        return LlamaCppEngine(llama_cpp, threads, verbose)
    except VerifyError:
        return TorchEngine(threads, model_dir, verbose)


class Evaluator:
    """Evaluates GGUFs against one base on one text; the base runs once per cache key."""

    def __init__(self, base: Path, text: Path, engine, *, n_ctx: int = 512, n_chunks: int | None = None,
                 cache: LogitsCache | None = None, log: Callable[[str], None] = print):
        self.base, self.text, self.engine = Path(base), Path(text), engine
        self.n_ctx, self.n_chunks = n_ctx, n_chunks
        self.cache = cache or LogitsCache()
        self.log = log
        for p, what in ((self.base, "base GGUF"), (self.text, "text")):
            if not p.is_file():
                raise VerifyError(f"{p}: {what} not found")
        self.vocab = vocab_fingerprint(self.base)
        self.key = self.cache.key(self.base, text_sha256(self.text), n_ctx, n_chunks, engine.name)
        self.base_meta = self._ensure_base()

    def _ensure_base(self) -> dict:
        meta = self.cache.meta(self.key)
        if meta is not None:
            self.log(f"base log-probs: cached ({self.key})")
            return meta
        self.log(f"base log-probs: running {self.base.name} with the {self.engine.name} engine")
        import tempfile

        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="verify-base-") as td:
            raw = Path(td) / "base.kld"
            info = self.engine.run_base(self.base, self.text, self.n_ctx, self.n_chunks, raw)
            meta = {**info, "seconds": time.time() - t0, "engine": self.engine.name, "n_ctx": self.n_ctx,
                    "base": str(self.base), "text": str(self.text)}
            self.cache.store(self.key, raw, meta)
        return meta

    def base_entry(self) -> Entry:
        size, bpw = gguf_size(self.base)
        n_tok = self.base_meta["n_chunk"] * (self.n_ctx - 1 - self.n_ctx // 2)
        m = Metrics(n_tokens=n_tok, ppl=self.base_meta["ppl"], ppl_err=self.base_meta["ppl_err"],
                    ppl_base=self.base_meta["ppl"], ppl_base_err=self.base_meta["ppl_err"], kld_mean=0.0,
                    kld_p99=0.0, kld_p999=0.0, same_top=100.0)
        return Entry(self.base.name, str(self.base), "base", size, bpw, m, self.base_meta.get("seconds", 0.0))

    def check_vocab(self, path: Path) -> None:
        v = vocab_fingerprint(path)
        if v is not None and self.vocab is not None and v != self.vocab:
            raise VerifyError(f"{path}: its vocabulary ({v[0]} tokens) differs from the base's ({self.vocab[0]} "
                              f"tokens); compare only GGUFs converted from the same model")

    def evaluate_many(self, items: Sequence[tuple[Path, str, str]]) -> list[Entry]:
        """items: (path, label, group); the cached base file is decompressed once for all of them."""
        out = []
        with self.cache.open_raw(self.key) as raw:
            for path, label, group in items:
                path = Path(path)
                if not path.is_file():
                    raise VerifyError(f"{path}: GGUF not found")
                self.check_vocab(path)
                t0 = time.time()
                m = self.engine.compare(path, raw, self.n_ctx, self.text)
                size, bpw = gguf_size(path)
                e = Entry(label, str(path), group, size, bpw, m, time.time() - t0)
                self.log(f"  {label:<24} {size:8.1f} MiB {bpw:6.3f} bpw  PPL {m.ppl:.4f}  "
                         f"KLD {m.kld_mean:.6f}  same-top {m.same_top:.2f}%  ({e.seconds:.1f}s)")
                out.append(e)
        return out


def _run_tool(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    if proc.returncode != 0:
        from verify.llamacpp_engine import failure_message

        raise VerifyError(f"{what} failed: {failure_message(proc.stdout + proc.stderr)}")


def make_references(base: Path, out_dir: Path, *, model_dir: Path | None = None,
                    uniform: Sequence[str] = UNIFORM_TYPES, stock: Sequence[str] = (),
                    imatrix: Path | None = None, llama_cpp: str | None = None,
                    log: Callable[[str], None] = print) -> list[tuple[Path, str, str]]:
    """Uniform quants (our converter from model_dir when it exists, else llama-quantize --pure) and
    llama-quantize stock mixes with the given imatrix; existing files in out_dir are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items: list[tuple[Path, str, str]] = []
    converter = ROOT / "convert_hf_to_gguf_strategy.py"
    quantize = None
    try:
        from llamacpp.reference import find_reference

        quantize = find_reference(llama_cpp).tool("llama-quantize")
    except Exception:  # noqa: BLE001 - no reference build: only our converter can make references
        quantize = None
    for t in uniform:
        name = t.lower()
        dest = out_dir / f"{base.stem}-uniform-{name}.gguf"
        if not dest.is_file():
            tmp = dest.with_name(dest.name + ".part")
            made = False
            if model_dir is not None and converter.is_file():
                try:
                    _run_tool([sys.executable, str(converter), str(model_dir), "--outtype", name,
                               "--outfile", str(tmp)], f"{converter.name} --outtype {name}")
                    made = True
                except VerifyError as e:
                    log(f"  our converter could not write {name} ({e}); using llama-quantize --pure")
            if not made:
                if quantize is None:
                    raise VerifyError(f"cannot make uniform {name}: pass --model-dir (our converter) or build "
                                      f"llama-quantize (`python -m llamacpp.build`)")
                log(f"  llama-quantize --pure {name.upper()} -> {dest.name}")
                _run_tool([str(quantize), "--pure", str(base), str(tmp), name.upper()], f"llama-quantize {name}")
            os.replace(tmp, dest)
        items.append((dest, f"uniform {name.upper()}", "uniform"))
    if stock and quantize is not None:
        for mix in stock:
            tag = "-imat" if imatrix else ""
            dest = out_dir / f"{base.stem}-stock-{mix.lower()}{tag}.gguf"
            if not dest.is_file():
                tmp = dest.with_name(dest.name + ".part")
                cmd = [str(quantize)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(base), str(tmp), mix]
                log(f"  llama-quantize {mix} -> {dest.name}")
                _run_tool(cmd, f"llama-quantize {mix}")
                os.replace(tmp, dest)
            items.append((dest, f"stock {mix}", "stock"))
    elif stock:
        log("  no llama-quantize: stock mixes skipped")
    return items


def run_pipeline(base: Path, text: Path, candidates: Sequence[Path], *, engine: str = "auto",
                 llama_cpp: str | None = None, model_dir: Path | None = None, n_ctx: int = 512,
                 n_chunks: int | None = None, compare_uniform: bool = False,
                 uniform: Sequence[str] = UNIFORM_TYPES, stock: Sequence[str] = STOCK_MIXES,
                 imatrix: Path | None = None, out_dir: Path | None = None, cache_dir: Path | None = None,
                 threads: int | None = None, labels: Sequence[str] | None = None,
                 log: Callable[[str], None] = print, verbose: bool = False) -> Report:
    """Evaluate candidates (and, with compare_uniform, reference quants) against base on text."""
    eng = make_engine(engine, llama_cpp=llama_cpp, threads=threads, model_dir=model_dir, verbose=verbose)
    ev = Evaluator(base, text, eng, n_ctx=n_ctx, n_chunks=n_chunks, cache=LogitsCache(cache_dir), log=log)
    items = [(Path(c), (labels[i] if labels else Path(c).stem), "ours") for i, c in enumerate(candidates)]
    if compare_uniform:
        ref_dir = (Path(out_dir) if out_dir else Path(base).parent) / "models"
        items += make_references(Path(base), ref_dir, model_dir=model_dir, uniform=uniform, stock=stock,
                                 imatrix=imatrix, llama_cpp=llama_cpp, log=log)
    rep = Report(base=ev.base_entry(), engine=eng.name, n_ctx=n_ctx, n_chunk=ev.base_meta["n_chunk"],
                 text=str(text))
    log(f"  {'base ' + Path(base).name:<24} PPL {rep.base.metrics.ppl:.4f} +/- {rep.base.metrics.ppl_err:.4f}")
    rep.entries = ev.evaluate_many(items)
    if out_dir is not None:
        from verify.report import write_report

        write_report(rep, Path(out_dir))
    return rep

