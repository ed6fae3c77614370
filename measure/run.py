"""Measure every quantizable tensor x every candidate type, in parallel, resumable.

The parent reads tensors one at a time through `catalog.iter_tensors` (exactly what the converter emits) and
parks each as a .npy file in shared memory; worker processes memory-map it, round-trip it through one type
and hand the numbers back; the parent writes each result in its own transaction. Units are (tensor, type), so
a big tensor (token_embd) is spread over all cores instead of keeping one busy for all types.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from measure.records import Measurement


@dataclass
class RunSummary:
    db: Path
    run_key: str
    n_tensors: int
    n_types: int
    computed: int
    skipped: int
    not_applicable: int
    seconds: float


class Progress:
    """One stderr line: tensors done, results, weights/s, ETA; redrawn at most 5 times a second."""

    def __init__(self, n_tensors: int, total_units: int, total_weight: float, enabled: bool = True):
        self.n_tensors, self.total_units, self.total_weight = n_tensors, total_units, total_weight
        self.units = self.weight = 0.0
        self.tensors_done = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.enabled = enabled and total_units > 0

    def update(self, units: int = 0, weight: float = 0.0, tensors: int = 0, force: bool = False) -> None:
        self.units += units
        self.weight += weight
        self.tensors_done += tensors
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.weight / el
        eta = (self.total_weight - self.weight) / rate if rate > 0 else float("nan")
        eta_s = "?" if eta != eta else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        sys.stderr.write(f"\r[measure] tensors {self.tensors_done}/{self.n_tensors}  results "
                         f"{int(self.units)}/{self.total_units}  {rate / 1e6:.1f} Mweights/s  ETA {eta_s}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")


def _worker_init() -> None:
    """One thread per worker: the pool already fills the cores.

    The environment variables reach only libraries the worker loads later (numba). Forked workers inherit the
    parent's numpy, whose BLAS pool was sized at import, so it is resized in place; left alone, each worker's BLAS
    thread competed with the other workers for the cores (the compensated measurement's per-unit seconds fell
    4-7x on 2 cores when it was resized: docs/measure.md)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _worker_warm_up() -> None:
    """Import the quantizers (and load their compiled kernels) while the parent is still importing the converter."""
    import measure.roundtrip  # noqa: F401
    import quants  # noqa: F401


def _measure_unit(path: str, name: str, qtype: str, importance: np.ndarray | None, cls: str,
                  layer: int | None, backend: str = "numpy", sample: float = 1.0, hessian_path: str | None = None
                  ) -> tuple[str, str, Measurement | None, float]:
    from measure.roundtrip import measure_tensor

    t0 = time.perf_counter()
    data = np.load(path, mmap_mode="r")
    hessian = np.load(hessian_path) if hessian_path else None
    m = measure_tensor(name, np.asarray(data), qtype, importance, tensor_class=cls, layer=layer, backend=backend,
                       sample=sample, hessian=hessian)
    return name, qtype, m, time.perf_counter() - t0


def _shm_root() -> Path:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    for stale in root.glob("measure-tensors-*"):  # left behind by a killed run
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    return root


def run(model_dir: str | os.PathLike, db_path: str | os.PathLike, *, imatrix_paths: Sequence[str | os.PathLike] = (),
        combine: str = "mean", types: Sequence[str] | None = None, workers: int | None = None,
        progress: bool = True, tensors: Sequence[str] | None = None, backend: str = "numpy",
        sample: float = 1.0, hessian_path: str | os.PathLike | None = None) -> RunSummary:
    """Measure and store; raises catalog.ModelInputError / ImatrixError / DBError for bad input.

    `hessian_path` (input covariances, `measure.hessian`) measures the error-compensated encoding of every
    2-D tensor the file covers, as the converter writes it with the same file."""
    from measure.db import DBError
    from measure.roundtrip import DEFAULT_TYPES

    t_start = time.monotonic()
    if not 0.0 < sample <= 1.0:
        raise DBError(f"--sample {sample}: must be a fraction in (0, 1]")
    if backend == "ggml" and hessian_path is not None:
        raise DBError("--hessian measures our error-compensated encoding, which libggml has no quantizer for; "
                      "drop --quantizer ggml")
    if backend == "ggml":
        from llamacpp.ggml import load_libggml
        from llamacpp.reference import ReferenceNotFound

        try:
            load_libggml()
        except (ReferenceNotFound, OSError) as e:
            raise DBError(f"--quantizer ggml needs the reference libggml-base ({e})") from None
    model_dir = Path(model_dir)
    types = list(types or DEFAULT_TYPES)
    n_workers = max(1, workers or os.cpu_count() or 1)
    # workers start now (forked before the parent imports torch and the converter) and warm up meanwhile
    pool = ProcessPoolExecutor(max_workers=n_workers, initializer=_worker_init) if n_workers > 1 else None
    try:
        if pool is not None:
            for _ in range(n_workers):
                pool.submit(_worker_warm_up)
        return _run(model_dir, db_path, pool, n_workers, imatrix_paths, combine, types, progress, tensors, backend,
                    sample, t_start, hessian_path)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _run(model_dir: Path, db_path, pool, n_workers: int, imatrix_paths, combine: str, types: list[str],
         progress: bool, tensors, backend: str, sample: float, t_start: float, hessian_path=None) -> RunSummary:
    import catalog
    from measure.db import MeasurementDB, model_fingerprint, quantizer_version
    from measure.imatrix import load_imatrix
    from measure.roundtrip import applicable

    infos = catalog.list_tensors(model_dir)
    quant = [i for i in infos if i.quantizable and (tensors is None or i.name in set(tensors))]
    imat = load_imatrix(list(imatrix_paths), combine) if imatrix_paths else None
    if imat is not None:
        from measure.smooth import check_imatrix_pairing

        imat.check_model([(i.name, i.shape) for i in infos if i.quantizable])
        check_imatrix_pairing(model_dir, imat, imatrix_paths[0])
    hess = None
    if hessian_path is not None:
        from measure.hessian import load_hessians

        hess = load_hessians(hessian_path)
        hess.check((i.name, i.shape[-1]) for i in quant if len(i.shape) == 2)  # another model fails before any work
    imatrix_fp = imat.fingerprint() if imat else None
    if hess is not None:  # another covariance, other bytes: a run of its own
        imatrix_fp = f"{imatrix_fp or ''}+cov:{hess.fingerprint()}"

    db = MeasurementDB(db_path, readonly=False)
    try:
        key = db.bind(model_fp=model_fingerprint(model_dir), model_dir=str(model_dir.resolve()),
                      imatrix_fp=imatrix_fp,
                      imatrix_paths=[str(Path(p).resolve()) for p in imatrix_paths],
                      quant_version=quantizer_version(backend), types=types, sample=sample)
        db.put_tensors((i.name, i.shape, i.n_params, i.cls, i.layer, i.quantizable,
                        (c.describe() if imat is not None and (c := imat.coverage(i.name)) else None)) for i in infos)
        done = db.done(key)
        todo: dict[str, list[str]] = {}
        n_na = 0
        for i in quant:
            left = [t for t in types if (i.name, t) not in done]
            # types that cannot hold this row length are recorded right away (not an error, nothing to compute)
            for t in [t for t in left if not applicable(i.shape, t)]:
                db.put_result(key, i.name, t, None)
                n_na += 1
            left = [t for t in left if applicable(i.shape, t)]
            if left:
                todo[i.name] = left
        skipped = sum(1 for i in quant for t in types if (i.name, t) in done)
        by_name = {i.name: i for i in quant}
        total_units = sum(len(v) for v in todo.values())
        bar = Progress(len(quant), total_units, sum(by_name[n].n_params * len(v) for n, v in todo.items()), progress)
        bar.tensors_done = len(quant) - len(todo)
        computed = 0
        if todo:
            computed = _execute(model_dir, db, key, todo, by_name, imat, pool, n_workers, bar, backend, sample, hess)
        bar.close()
    finally:
        db.close()
    return RunSummary(Path(db_path), key, len(quant), len(types), computed, skipped, n_na, time.monotonic() - t_start)


def _execute(model_dir: Path, db, key: str, todo: dict[str, list[str]], by_name: dict, imat, pool, n_workers: int,
             bar: Progress, backend: str, sample: float, hess=None) -> int:
    import catalog

    shm = Path(tempfile.mkdtemp(prefix=f"measure-tensors-{os.getpid()}-", dir=_shm_root()))
    remaining = {n: len(v) for n, v in todo.items()}
    computed = 0
    max_inflight = 3 * n_workers
    try:
        pending: set[Future] = set()

        def collect(block: bool) -> None:
            nonlocal computed, pending
            if not pending:
                return
            finished, pending = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for f in finished:
                name, qtype, m, secs = f.result()
                record(name, qtype, m, secs)

        def record(name: str, qtype: str, m: Measurement | None, secs: float) -> None:
            nonlocal computed
            db.put_result(key, name, qtype, m, secs)
            computed += 1
            remaining[name] -= 1
            finished_tensor = remaining[name] == 0
            if finished_tensor:
                (shm / f"{_safe(name)}.npy").unlink(missing_ok=True)
                (shm / f"{_safe(name)}.cov.npy").unlink(missing_ok=True)
            bar.update(units=1, weight=by_name[name].n_params, tensors=int(finished_tensor))

        for info, data in catalog.iter_tensors(model_dir, names=set(todo)):
            path = shm / f"{_safe(info.name)}.npy"
            imp = imat.importance_for(info.name, info.shape) if imat is not None else None
            hpath = None
            h = hess.for_tensor(info.name, info.shape[-1]) if hess is not None and len(info.shape) == 2 else None
            if h is not None:
                hpath = str(shm / f"{_safe(info.name)}.cov.npy")
                np.save(hpath, h)
            if pool is None:
                np.save(path, data)
                for t in todo[info.name]:
                    record(*_measure_unit(str(path), info.name, t, imp, info.cls, info.layer, backend, sample, hpath))
                continue
            np.save(path, np.ascontiguousarray(data, dtype=np.float32))
            del data
            for t in todo[info.name]:
                while len(pending) >= max_inflight:
                    collect(block=True)
                pending.add(pool.submit(_measure_unit, str(path), info.name, t, imp, info.cls, info.layer, backend,
                                        sample, hpath))
                collect(block=False)
        while pending:
            collect(block=True)
    finally:
        if pending:
            for f in pending:
                f.cancel()
            wait(pending)  # running units finish before their inputs disappear
        shutil.rmtree(shm, ignore_errors=True)
    return computed


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
