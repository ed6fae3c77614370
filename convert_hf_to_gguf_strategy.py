#!/usr/bin/env python3
"""Hugging Face checkpoint -> mixed-precision GGUF in one pass, with any per-tensor plan.

A fork of llama.cpp's convert_hf_to_gguf.py built on upstream's own code: we import its `conversion` package
and its command line (`convert_hf_to_gguf.parse_args` builds the parser; `main` does the run), and hook the
model class it picks (catalog.hook). Every upstream option keeps working; new ones:

  --strategy FILE        per-tensor types (strategy/plan.py format, YAML or JSON)
  --imatrix FILE         importance matrix (llama.cpp GGUF imatrix or legacy .dat), repeatable
  --outtype TYPE         any type we can write, case-insensitive (q4_k, Q6_K, iq4_xs, ...), or f32/f16/bf16/q8_0/auto
  --default-type TYPE    type for tensors the strategy does not name
  --export-tensor-type-file OUT   write the plan as llama-quantize --tensor-type-file lines and exit
  --llama-cpp DIR        llama.cpp checkout to take the converter sources from

Each tensor is quantized when the writer reaches it (upstream's lazy streaming), with its imatrix entry,
through quants.quantize; type choice, F32 rules and shape fallbacks follow llama-quantize (catalog.rules).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("convert-strategy")

UPSTREAM_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")
FLOAT_OUTTYPES = ("f32", "f16", "bf16", "auto")
STRATEGY_DIGEST_KEY = "quantize.strategy.sha256"
STRATEGY_FILE_KEY = "quantize.strategy.file"
COMPENSATED_KEY = "quantize.strategy.covariance_file"  # set when blocks were error-compensated (--hessian)


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 1."""


# ------------------------------------------------------------------------------------------------ type policy
@dataclass
class TypePolicy:
    """Which type each tensor gets: the strategy (explicit entry > rule > --default-type > plan default) or the
    uniform --outtype; llama-quantize's F32 rules and shape fallbacks applied on top."""

    plan: Any = None                  # strategy.plan.Plan | None
    default_type: str | None = None   # --default-type
    uniform: str = "auto"             # --outtype when no strategy

    def requested(self, name: str) -> str:
        if self.plan is not None:
            explicit = self.plan.explicit_type(name)
            if explicit is not None:
                return explicit
            return self.default_type or self.plan.default_type
        return self.default_type or self.uniform

    def effective_plan(self) -> Any:
        """The plan as applied (with --default-type folded in), for digests and exports."""
        from strategy.plan import Plan

        if self.plan is None:
            return Plan(default_type=(self.default_type or self.uniform).upper())
        if self.default_type is None:
            return self.plan
        return Plan(default_type=self.default_type.upper(), tensors=self.plan.tensors, rules=self.plan.rules,
                    model=self.plan.model, method=self.plan.method, target=self.plan.target, extra=self.plan.extra)


_FILE_TYPE_FOR: dict[str, str] = {
    "F32": "ALL_F32", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
}


def llama_file_type(type_name: str) -> Any:
    """GGML type name -> the LlamaFileType llama.cpp shows for a file made mostly of it."""
    import gguf

    return gguf.LlamaFileType[_FILE_TYPE_FOR.get(type_name, f"MOSTLY_{type_name}")]


# ------------------------------------------------------------------------------------------------ the sink
@dataclass
class ConvertSink:
    """Receives every tensor from the hooked upstream model, picks its type, binds type + importance into a
    lazy quantization node and forwards it to upstream's writer. No global "current tensor" state: each node
    carries its own arguments, so the writer may evaluate them whenever it likes."""

    policy: TypePolicy
    imatrix: Any = None               # measure.imatrix.Imatrix | None
    hessians: Any = None              # measure.hessian.Hessians | None: error-compensated encoding where covered
    float_type: str | None = None     # resolved --outtype auto (bf16 / f16, as upstream guesses it)
    params_by_type: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fallbacks: dict[str, list[tuple[str, str, str, int]]] = field(default_factory=lambda: defaultdict(list))
    n_tensors: int = 0
    n_with_importance: int = 0
    n_compensated: int = 0
    validate: Any = None              # callable(list[TensorInfo]) raising UserError, run before anything is written
    prefetcher: Prefetcher | None = None
    _pending: list[Any] | None = None

    def begin(self) -> None:
        """Buffer what upstream emits (still lazy, so cheap) until `flush`: the whole tensor list is validated
        against the strategy and the imatrix first, in the same pass, before any output exists."""
        self._pending = []

    def flush(self, model: Any) -> None:
        pending, self._pending = self._pending or [], None
        if self.validate is not None:
            self.validate([em.info for em in pending])
        pending.reverse()
        while pending:
            self(model, pending.pop())

    def __call__(self, model: Any, em: Any) -> None:
        import gguf

        if self._pending is not None:
            self._pending.append(em)
            return
        info = em.info
        self.n_tensors += 1
        if em.raw:
            model.write_raw_tensor(info.name, em.data, raw_dtype=em.raw_dtype, raw_shape=em.raw_shape)
            logger.info(f"{info.name + ',':<40} as written by the model code ({info.fixed_type})")
            return
        final, requested = self.choose(model, em)
        qtype = gguf.GGMLQuantizationType[final]
        importance = self.importance_for(info, final) if final not in ("F32", "F16", "BF16", "Q8_0") else None
        if importance is not None:
            self.n_with_importance += 1
        hessian = row_covariances = None
        if self.hessians is not None and len(info.shape) == 2 and final not in ("F32", "F16", "BF16"):
            hessian = self.hessians.for_tensor(info.name, info.n_per_row)
            self.n_compensated += hessian is not None
            if hessian is not None:
                row_covariances = self.hessians.row_covariances(info.name, info.n_per_row)
        if len(info.shape) >= 2:
            self.params_by_type[final] += info.n_params
        note = f" (asked {requested}: rows of {info.n_per_row})" if requested and requested != final else ""
        logger.info(f"{info.name + ',':<40} {info.source_dtype:<8} --> {final}{note}, shape = {{{', '.join(map(str, info.ne))}}}"
                    + (" +imatrix" if importance is not None else "") + (" +compensated" if hessian is not None else "")
                    + (f" +{len(row_covariances.rows)} rows by own covariance" if row_covariances is not None else ""))
        if isinstance(em.data, gguf.LazyChunkedTensor):  # upstream streams it in chunks; keep that
            if importance is not None or hessian is not None:
                logger.warning(f"{info.name}: written in chunks by upstream; importance/covariance not applied")
            model.write_raw_tensor(info.name, em.data.quantize(qtype), raw_dtype=qtype)
            return
        data = QuantizedTensor(em.data, qtype, importance, info.name, self.prefetcher, hessian, row_covariances)
        model.write_raw_tensor(info.name, data, raw_dtype=qtype)

    def choose(self, model: Any, em: Any) -> tuple[str, str | None]:
        """(final type name, requested type name or None when the tensor is not ours to choose)."""
        import quants
        from catalog.rules import fallback_type

        info = em.info
        uniform_float = self.policy.plan is None and (self.policy.default_type or self.policy.uniform).lower() \
            in FLOAT_OUTTYPES
        if uniform_float:
            # plain float outtypes behave exactly as upstream's converter: every tensor it would convert
            upstream_converts = str(em.upstream_type.name) == "F16" and em.forced in (None, True)
            if not upstream_converts:
                return info.fixed_type or "F32", None
            want = (self.policy.default_type or self.policy.uniform).lower()
            if want == "auto":
                want = self.guess_float(model)
            return want.upper(), None
        if not info.quantizable:
            return info.fixed_type or "F32", None
        requested = quants.parse_type(self.policy.requested(info.name))
        choice = fallback_type(requested, info.n_per_row)
        if choice.fell_back:
            self.fallbacks[info.cls].append((info.name, requested.name, choice.final.name, info.n_per_row))
        return choice.final.name, requested.name

    def guess_float(self, model: Any) -> str:
        """--outtype auto: upstream's heuristic (the first 2-D checkpoint tensor's dtype: bf16 -> bf16, else f16)."""
        if self.float_type is None:
            import torch

            self.float_type = "f16"
            for _, t in model.get_tensors():
                if t.dim() < 2:
                    continue
                self.float_type = "bf16" if t.dtype == torch.bfloat16 else "f16"
                break
        return self.float_type

    def importance_for(self, info: Any, final: str) -> np.ndarray | None:
        """This tensor's importance as llama-quantize applies it (size checked; MoE: one row per expert)."""
        if self.imatrix is None:
            return None
        from measure.imatrix import ImatrixError

        try:
            imp = self.imatrix.importance_for(info.name, info.shape)
        except ImatrixError as e:
            raise UserError(str(e)) from None
        return None if imp is None else np.asarray(imp, dtype=np.float32)

    def file_type_name(self) -> str:
        """The type covering most weights (2-D and 3-D tensors, by parameter count)."""
        if not self.params_by_type:
            return "F32"
        return max(self.params_by_type.items(), key=lambda kv: kv[1])[0]

    def report_fallbacks(self) -> None:
        for cls, items in sorted(self.fallbacks.items()):
            pairs = sorted({f"{a}->{b}" for _, a, b, _ in items})
            rows = sorted({n for *_, n in items})
            logger.warning(f"fallback {cls}: {len(items)} tensor(s) {', '.join(pairs)} "
                           f"(rows of {', '.join(map(str, rows))} not a multiple of the block size), as llama-quantize does")


def _quantize_now(data: Any, qtype: Any, importance: np.ndarray | None, name: str,
                  hessian: np.ndarray | None = None, row_covariances: Any = None) -> np.ndarray:
    """Quantize one tensor (MoE experts one by one, each with its own importance slice; error-compensated when
    a 2-D tensor has an input covariance)."""
    import quants
    from catalog.hook import to_float32

    x = to_float32(data)
    if qtype.name not in {t.name for t in quants.WRITABLE_TYPES}:
        import gguf  # types only upstream can write (e.g. forced by a model class)

        return gguf.quants.quantize(x, qtype)
    try:
        return quants.quantize(x, qtype, importance, name=name, hessian=hessian,  # a 2-D importance is per expert
                               row_covariances=row_covariances)
    except quants.QuantInputError as e:
        raise UserError(str(e)) from None


class Prefetcher:
    """Quantizes the tensors after the one being written on worker threads (numpy releases the GIL in its
    kernels), bounded by a byte budget of float32 input in flight so peak memory stays near one tensor.

    While it runs with several threads, BLAS runs one thread per call: the quantize threads already fill the cores,
    and each call's own BLAS pool only competed with them (the compensated SmolLM2 Q5_K_M convert on 2 cores:
    582 s -> 495 s, CPU time 1115 s -> 633 s, same bytes)."""

    def __init__(self, threads: int, budget_bytes: int = 64 * 2**20):
        from concurrent.futures import ThreadPoolExecutor

        self.items: list[QuantizedTensor] = []
        self.budget = budget_bytes
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="quantize") if threads > 1 else None
        self._blas_limit: Any = None
        if self.pool is not None:
            from threadpoolctl import threadpool_limits

            self._blas_limit = threadpool_limits(1, user_api="blas")  # restored by close()

    def add(self, item: QuantizedTensor) -> int:
        self.items.append(item)
        return len(self.items) - 1

    def ensure(self, i: int) -> None:
        """Item i and the following ones that fit the budget are queued (each at most once)."""
        if self.pool is None:
            return
        ahead = 0
        for j in range(i, len(self.items)):
            if j > i:
                ahead += self.items[j].in_bytes
                if ahead > self.budget:
                    break
            self.items[j].submit(self.pool)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None


class QuantizedTensor:
    """What the GGUF writer holds for one tensor: shape, dtype and nbytes now; the bytes when it writes them.

    Type, importance and name are bound at construction (hook time), so evaluation order does not matter: the
    prefetcher may compute it on a worker thread, or the writer inline."""

    def __init__(self, source: Any, qtype: Any, importance: np.ndarray | None, name: str,
                 prefetcher: Prefetcher | None = None, hessian: np.ndarray | None = None,
                 row_covariances: Any = None):
        import gguf

        T = gguf.GGMLQuantizationType
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        in_shape = tuple(int(d) for d in source.shape)
        self.dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16 if qtype == T.F16 else np.uint8)
        self.shape = in_shape if self.dtype != np.uint8 else (*in_shape[:-1], in_shape[-1] // bs * ts)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.in_bytes = int(np.prod(in_shape, dtype=np.int64)) * 4
        self._source, self._qtype, self._importance, self._name = source, qtype, importance, name
        self._hessian, self._row_covariances = hessian, row_covariances
        self._swap = False
        self._future: Any = None
        self._lock = threading.Lock()
        self._prefetcher = prefetcher
        self._index = prefetcher.add(self) if prefetcher is not None else -1

    def _compute(self) -> np.ndarray:
        from catalog.hook import no_grad

        source, self._source = self._source, None  # the lazy graph is released as soon as it is evaluated
        with no_grad():
            out = _quantize_now(source, self._qtype, self._importance, self._name, self._hessian,
                                self._row_covariances)
        self._hessian = self._row_covariances = None
        return np.asarray(out).astype(self.dtype, copy=False).reshape(self.shape)

    def submit(self, pool: Any) -> None:
        with self._lock:
            if self._future is None and self._source is not None:
                self._future = pool.submit(self._compute)

    def numpy(self) -> np.ndarray:
        if self._prefetcher is not None:
            self._prefetcher.ensure(self._index)
        with self._lock:
            future = self._future
        out = future.result() if future is not None else self._compute()
        self._future = None
        return out.byteswap() if self._swap else out

    def tofile(self, fout: Any) -> None:
        self.numpy().tofile(fout)

    def byteswap(self, inplace: bool = False) -> QuantizedTensor:
        """Big-endian output (--bigendian): swapped when written."""
        self._swap = not self._swap
        return self


# ------------------------------------------------------------------------------------------------ the hooked run
class AtomicOutputMixin:
    """Write into a hidden temp dir next to the destination, then rename into place: an interrupted or failed
    run (Ctrl-C, kill, disk full) never leaves a partial file under the destination name."""

    _atomic_tmpdir: Path | None = None
    _atomic_final: Path | None = None
    _extra_kv: dict[str, Any] = {}

    def prepare_metadata(self, vocab_only: bool) -> None:
        super().prepare_metadata(vocab_only)  # type: ignore[misc]
        writer = self.gguf_writer  # type: ignore[attr-defined]
        for key, value in self._extra_kv.items():
            if isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_uint32(key, int(value))
        if getattr(self, "dry_run", False):
            return
        final = Path(self.fname_out)  # type: ignore[attr-defined]
        final.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_final = final
        self._atomic_tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        self.fname_out = self._atomic_tmpdir / final.name

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        try:
            yield
        except BaseException as e:
            if self._atomic_tmpdir is not None:
                with contextlib.suppress(Exception):
                    self.gguf_writer.close()  # type: ignore[attr-defined]
                shutil.rmtree(self._atomic_tmpdir, ignore_errors=True)
                if isinstance(e, OSError) and e.errno is not None and self._atomic_final is not None:
                    from outputs import at_destination

                    raise at_destination(e, self._atomic_final) from e
            raise
        if self._atomic_tmpdir is not None and self._atomic_final is not None:
            for f in sorted(self._atomic_tmpdir.iterdir()):
                os.replace(f, self._atomic_final.parent / f.name)
            self._atomic_tmpdir.rmdir()
            self.fname_out = self._atomic_final

    def write(self) -> None:
        with self._atomic():
            super().write()  # type: ignore[misc]

    def write_vocab(self) -> None:
        with self._atomic():
            super().write_vocab()  # type: ignore[misc]


@dataclass
class RunConfig:
    sink: ConvertSink
    extra_kv: dict[str, Any]


def run_class(model_class: type, cfg: RunConfig) -> type:
    """The class upstream's main() instantiates: upstream's class + our hook + atomic output, sink bound."""
    from catalog.hook import hooked_class

    hooked = hooked_class(model_class)
    sink = cfg.sink

    class _Run(AtomicOutputMixin, hooked):  # type: ignore[misc,valid-type]
        model_arch = model_class.model_arch
        _extra_kv = cfg.extra_kv

        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("sink", sink)
            super().__init__(*args, **kwargs)

        def prepare_tensors(self) -> None:
            sink.begin()
            super().prepare_tensors()
            sink.flush(self)
            sink.report_fallbacks()
            # general.file_type and the default file name: the type covering most weights
            self.ftype = llama_file_type(sink.file_type_name())

    _Run.__name__ = _Run.__qualname__ = f"Strategy{model_class.__name__}"
    return _Run


# ------------------------------------------------------------------------------------------------ command line
def _pre_args(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--llama-cpp", default=None)
    return pre.parse_known_args(argv)[0]


def upstream_parser() -> tuple[Any, argparse.ArgumentParser]:
    """Upstream's module and the parser its parse_args() builds (captured, not re-declared)."""
    import convert_hf_to_gguf as up

    class _Captured(Exception):
        pass

    box: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        box.append(self)
        raise _Captured

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        up.parse_args()
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    parser = box[0]
    parser.description = ("Convert a Hugging Face model to a (mixed-precision) GGUF in one pass: llama.cpp's "
                          "converter plus per-tensor strategies, imatrix and every quantization type.")
    parser.prog = "convert_hf_to_gguf_strategy.py"
    for action in parser._actions:
        if "--outtype" in action.option_strings:
            action.choices = None
            action.help = ("output type for every tensor without a strategy: f32, f16, bf16, q8_0, auto (as "
                           "upstream) or any quantization type, case-insensitive (q4_k, Q6_K, iq4_xs, q5_0...)")
    g = parser.add_argument_group("strategy options")
    g.add_argument("--strategy", type=Path, help="per-tensor types (YAML or JSON, see strategy/plan.py)")
    g.add_argument("--imatrix", type=Path, action="append", default=[],
                   help="importance matrix (llama.cpp GGUF imatrix or legacy .dat); repeat to combine")
    g.add_argument("--hessian", type=Path, default=None,
                   help="input covariances (`python -m measure imatrix --hessian`): error-compensated encoding "
                        "(GPTQ-style blocks ggml decodes) for every 2-D tensor the file covers")
    g.add_argument("--default-type", default=None, help="type for tensors the strategy does not name")
    g.add_argument("--export-tensor-type-file", type=Path, default=None,
                   help="write the strategy as llama-quantize --tensor-type-file lines to this file and exit")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads quantizing the next tensors while one is written (default: all CPUs)")
    g.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="llama.cpp checkout to take the converter sources from (default: $LLAMA_CPP_DIR, cache)")
    return up, parser


def _check_type(value: str, option: str) -> str:
    import quants

    if value.lower() in UPSTREAM_OUTTYPES:
        return value.lower()
    try:
        t = quants.parse_type(value)
    except (quants.QuantInputError, ValueError):
        t = None
    if t is None or t not in quants.WRITABLE_TYPES:
        valid = ", ".join(x.name.lower() for x in quants.WRITABLE_TYPES)
        raise UserError(f"{option} {value!r}: unknown type; valid types: auto, {valid}")
    return t.name


def _load_imatrix(paths: list[Path]) -> Any:
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: imatrix file not found")
    from measure.imatrix import ImatrixError, load_imatrix

    try:
        return load_imatrix(paths)
    except (ImatrixError, OSError, ValueError) as e:  # the loader names the file and the problem
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(msg if any(str(p) in msg for p in paths) else f"{paths[0]}: {msg}") from None


def _imatrix_kv(imatrix: Any, paths: list[Path]) -> dict[str, Any]:
    """The quantize.imatrix.* keys, as llama-quantize writes them (strings cut to 127 bytes, counts as u32)."""
    kv: dict[str, Any] = {"quantize.imatrix.file": ",".join(str(p) for p in paths)[:127]}
    datasets = list(getattr(imatrix, "datasets", None) or [])
    if datasets:
        kv["quantize.imatrix.dataset"] = str(datasets[0])[:127]  # llama-quantize: the first one
    kv["quantize.imatrix.entries_count"] = len(imatrix)
    if int(imatrix.chunks or 0) > 0:
        kv["quantize.imatrix.chunks_count"] = int(imatrix.chunks)
    return kv


@contextlib.contextmanager
def _hooked_upstream(up: Any, cfg: RunConfig, upstream_args: argparse.Namespace) -> Iterator[None]:
    """Point upstream's main() at our namespace and our model classes, for the duration of one run."""
    import conversion

    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        patches.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    original_get = conversion.get_model_class
    patch(up, "parse_args", lambda: upstream_args)
    patch(up, "get_model_class", lambda name, mmproj=False: run_class(original_get(name, mmproj=mmproj), cfg))
    # classes main() imports by name (mistral format, DSpark drafts)
    for mod_name, cls_names in (("conversion.mistral", ("MistralModel", "MistralMoeModel")),
                                ("conversion.pixtral", ("PixtralModel",)),
                                ("conversion.deepseek", ("DeepseekV4DSparkModel",))):
        try:
            mod = __import__(mod_name, fromlist=list(cls_names))
        except Exception:
            continue
        for cn in cls_names:
            if hasattr(mod, cn):
                patch(mod, cn, run_class(getattr(mod, cn), cfg))
    try:
        yield
    finally:
        for obj, attr, value in reversed(patches):
            setattr(obj, attr, value)


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno is not None and e.strerror:
            from outputs import os_error_line

            print(f"error: {os_error_line(e)}; no output written", file=sys.stderr)
            return 1
        raise


def _main(argv: list[str]) -> int:
    from catalog.hook import ModelInputError, activate, check_model_dir, resolve_model_class
    from llamacpp.upstream import UpstreamNotFound

    pre = _pre_args(argv)
    try:
        activate(pre.llama_cpp)
    except UpstreamNotFound as e:
        raise UserError(str(e)) from None
    up, parser = upstream_parser()
    args = parser.parse_args(argv)
    if args.model is None and not args.print_supported_models:
        parser.error("the following arguments are required: model")
    if args.print_supported_models:
        up.parse_args = lambda: args
        up.main()
        return 0

    from strategy.plan import PlanError, load_plan, tensor_type_file_lines, validate_plan

    outtype = _check_type(args.outtype, "--outtype")
    default_type = _check_type(args.default_type, "--default-type") if args.default_type else None
    if default_type in ("auto", "tq1_0", "tq2_0"):
        raise UserError(f"--default-type {default_type}: pick a concrete type (e.g. q4_k, q8_0, f16)")
    plan = None
    if args.strategy is not None:
        try:
            plan = load_plan(args.strategy)
        except PlanError as e:
            raise UserError(str(e)) from None
    elif args.export_tensor_type_file is not None and outtype.lower() in FLOAT_OUTTYPES + ("tq1_0", "tq2_0"):
        raise UserError("--export-tensor-type-file needs --strategy FILE (or a quantization --outtype)")

    pure_upstream = (plan is None and not args.imatrix and default_type is None and outtype in ("tq1_0", "tq2_0"))
    model_dir = Path(args.model)
    if not args.remote:
        try:
            check_model_dir(model_dir, args.mistral_format)
            if not args.mistral_format:
                resolve_model_class(model_dir, mmproj=args.mmproj)
        except ModelInputError as e:
            raise UserError(str(e)) from None
    if pure_upstream:  # ternary types: upstream's own path, untouched
        up.parse_args = lambda: args
        up.main()
        return 0

    policy = TypePolicy(plan=plan, default_type=default_type,
                        uniform=outtype if outtype.lower() in UPSTREAM_OUTTYPES else outtype.upper())
    if args.export_tensor_type_file is not None:
        import catalog

        try:
            infos = catalog.list_tensors(model_dir)
            if plan is not None:
                validate_plan(plan, [i.name for i in infos], source=str(args.strategy))
        except ModelInputError as e:
            raise UserError(str(e)) from None
        except PlanError as e:
            raise UserError(str(e)) from None
        lines = tensor_type_file_lines(policy.effective_plan(), [i.name for i in infos if i.quantizable])
        out = args.export_tensor_type_file
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {len(lines)} tensor types to {out} (use: llama-quantize --tensor-type-file {out} "
              f"IN.gguf OUT.gguf Q8_0)", file=sys.stderr)
        return 0

    imatrix = None
    extra_kv: dict[str, Any] = {}
    if args.imatrix:
        imatrix = _load_imatrix(args.imatrix)
        from measure.smooth import SmoothError, check_imatrix_pairing

        try:
            check_imatrix_pairing(model_dir, imatrix, args.imatrix[0])
        except SmoothError as e:
            raise UserError(str(e)) from None
        extra_kv.update(_imatrix_kv(imatrix, args.imatrix))

    def validate(infos: list[Any]) -> None:
        """Strategy names and imatrix entries against the tensors upstream emits (this same pass)."""
        if plan is not None:
            try:
                validate_plan(plan, [i.name for i in infos], source=str(args.strategy))
            except PlanError as e:
                raise UserError(str(e)) from None
            fixed = [i for i in infos if i.name in plan.tensors and not i.quantizable]
            if fixed:
                logger.warning(f"{args.strategy}: {len(fixed)} named tensor(s) are never quantized by llama.cpp and "
                               f"keep their type: " + ", ".join(f"{i.name} ({i.fixed_type})" for i in fixed[:5])
                               + (" ..." if len(fixed) > 5 else ""))
        if imatrix is not None:
            from measure.imatrix import ImatrixError

            try:  # another model: no entry names one of our tensors, or sizes disagree
                imatrix.check_model([(i.name, i.shape) for i in infos if i.quantizable])
            except ImatrixError as e:
                raise UserError(str(e)) from None
        if hessians is not None:
            from measure.hessian import HessianError

            try:  # a covariance for another model fails before any output exists
                hessians.check((i.name, i.n_per_row) for i in infos if len(i.shape) == 2)
            except HessianError as e:
                raise UserError(str(e)) from None

    if plan is not None or default_type is not None or outtype.lower() not in UPSTREAM_OUTTYPES or imatrix:
        extra_kv[STRATEGY_DIGEST_KEY] = policy.effective_plan().digest()
        if args.strategy is not None:
            extra_kv[STRATEGY_FILE_KEY] = args.strategy.name[:127]

    hessians = None
    if args.hessian is not None:
        from measure.hessian import HessianError, load_hessians

        try:
            hessians = load_hessians(args.hessian)
        except HessianError as e:
            raise UserError(str(e)) from None
        extra_kv[COMPENSATED_KEY] = args.hessian.name[:127]
    prefetcher = Prefetcher(max(1, args.threads))
    sink = ConvertSink(policy=policy, imatrix=imatrix, validate=validate, prefetcher=prefetcher, hessians=hessians)
    cfg = RunConfig(sink=sink, extra_kv=extra_kv)
    upstream_args = argparse.Namespace(**vars(args))
    upstream_args.outtype = "f16"  # the hook's base: upstream asks F16 for tensors it would convert
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    try:
        with _hooked_upstream(up, cfg, upstream_args):
            up.main()
    finally:
        prefetcher.close()
    if sink.n_tensors:
        logger.info(f"{sink.n_tensors} tensors; most weights in {sink.file_type_name()}; "
                    f"{sink.n_with_importance} quantized with importance"
                    + (f", {sink.n_compensated} error-compensated" if hessians is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
