"""sqlite store of measurements, safe against SIGKILL at any moment.

Every result is one row written in its own transaction (WAL journal), so a killed run leaves only whole rows;
re-running skips every (tensor, type) already stored for the same run key. The run key is a fingerprint of
(model files, imatrix content, quantizer source version); each row's `fingerprint` adds the type. A db holds one
model: opening it for another model is refused, naming the model it was written for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from measure.records import Measurement
from outputs import is_disk_full, out_of_space, write_atomic

SCHEMA_VERSION = 1
NO_SPACE = ("no space left on device; free some space and re-run the same command (finished measurements are "
            "kept), or choose a --db path on another disk")
_MEAS_FIELDS = [f.name for f in fields(Measurement)]


class DBError(RuntimeError):
    """Unusable database (read-only path, other model, corrupt); one line naming the file and the fix."""


def _hash_file_sample(h, path: Path, n_samples: int = 16, sample: int = 1 << 16) -> None:
    """Size + header + evenly spaced samples: catches re-downloads and edits without reading 100s of GB."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= n_samples * sample * 2:
            h.update(f.read())
            return
        head = f.read(8)
        hdr_len = int.from_bytes(head, "little") if path.suffix == ".safetensors" else 0
        h.update(head + f.read(min(hdr_len, 1 << 24)))
        for i in range(n_samples):
            f.seek(size * i // n_samples)
            h.update(f.read(sample))


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in d.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".json", ".model") or p.name.startswith("consolidated")))
    for p in files:
        if p.suffix in (".json", ".model") and p.stat().st_size < (1 << 22):
            h.update(p.name.encode() + b":" + p.read_bytes())
        else:
            _hash_file_sample(h, p)
    return h.hexdigest()[:16]


def quantizer_version(backend: str = "numpy") -> str:
    """Hash of the quantizer sources, gguf version and backend: results from another quantizer are not reused."""
    import gguf

    import quants

    h = hashlib.sha256(f"{getattr(gguf, '__version__', '')}|{backend}".encode())
    qdir = Path(quants.__file__).parent
    for p in sorted(qdir.glob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    h.update((Path(__file__).parent / "roundtrip.py").read_bytes())
    return h.hexdigest()[:16]


def run_key(model_fp: str, imatrix_fp: str | None, quant_version: str, sample: float = 1.0) -> str:
    extra = "" if sample >= 1.0 else f"|sample={sample:.6g}"
    return hashlib.sha256(f"{model_fp}|{imatrix_fp or 'none'}|{quant_version}{extra}".encode()).hexdigest()[:16]


def result_fingerprint(key: str, qtype: str) -> str:
    return hashlib.sha256(f"{key}|{qtype}".encode()).hexdigest()[:16]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensors (
    name TEXT PRIMARY KEY, shape TEXT NOT NULL, n_params INTEGER NOT NULL, cls TEXT, layer INTEGER,
    quantizable INTEGER NOT NULL, imatrix_coverage TEXT);
CREATE TABLE IF NOT EXISTS results (
    run_key TEXT NOT NULL, tensor TEXT NOT NULL, qtype TEXT NOT NULL, fingerprint TEXT NOT NULL,
    applicable INTEGER NOT NULL, n_params INTEGER, n_bytes INTEGER, bpw REAL, rmse REAL, max_abs_err REAL,
    wmse REAL, rel_err REAL, cos REAL, tensor_class TEXT, layer INTEGER, seconds REAL, created REAL,
    sample REAL NOT NULL DEFAULT 1.0, PRIMARY KEY (run_key, tensor, qtype));
"""


def _no_space(e: sqlite3.Error, path: Path) -> bool:
    """sqlite's "disk is full", or its "disk I/O error" on a disk with next to nothing free (the WAL index)."""
    return is_disk_full(e) or ("disk I/O error" in str(e) and out_of_space(path.parent))


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        if not path.is_file():
            raise DBError(f"{path}: no such measurement database; run `python -m measure MODEL_DIR --db {path}` first")
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    else:
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise DBError(f"{path}: directory {parent} does not exist; create it or choose another --db path")
        if (path.exists() and not os.access(path, os.W_OK)) or (not path.exists() and not os.access(parent, os.W_OK)):
            raise DBError(f"{path}: database path is not writable; choose a writable --db path")
        try:
            con = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise DBError(f"{path}: cannot open the database ({e}); choose a writable --db path") from None
    try:
        if not readonly:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.executescript(_SCHEMA)
            _migrate(con)
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        con.close()
        if _no_space(e, path):
            raise DBError(f"{path}: {NO_SPACE}") from None
        if "readonly" in str(e) or "read-only" in str(e) or "unable to open" in str(e):
            raise DBError(f"{path}: database is read-only ({e}); choose a writable --db path") from None
        raise DBError(f"{path}: not a usable measurement database ({e}); delete it or choose another --db path") from None
    return con


def _migrate(con: sqlite3.Connection) -> None:
    """Bring databases written by older versions up to the current schema (columns only ever get added)."""
    cols = {row[1] for row in con.execute("PRAGMA table_info(results)")}
    if "sample" not in cols:  # added with --sample; older rows are exact measurements
        con.execute("ALTER TABLE results ADD COLUMN sample REAL NOT NULL DEFAULT 1.0")


class MeasurementDB:
    """Read/write access. Readers (strategy/) use `measurements()` and `model_info()`."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool | None = None):
        self.path = Path(path)
        if readonly is None:
            readonly = self.path.is_file() and not os.access(self.path, os.W_OK)
        self.readonly = readonly
        self.con = _connect(self.path, readonly=readonly)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> MeasurementDB:
        return self

    def __exit__(self, *a) -> None:
        self.close()

    # --- metadata --------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        try:
            return dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            return {}

    def model_info(self) -> dict[str, object]:
        """fingerprint, model_dir, imatrix (paths + fingerprint), types, quantizer version of the latest run."""
        m = self.meta()
        return {
            "model_fingerprint": m.get("model_fingerprint"), "model_dir": m.get("model_dir"),
            "imatrix": json.loads(m.get("imatrix_paths", "[]")), "imatrix_fingerprint": m.get("imatrix_fingerprint"),
            "quantizer_version": m.get("quantizer_version"), "run_key": m.get("run_key"),
            "types": json.loads(m.get("types", "[]")), "sample": float(m.get("sample", "1.0")),
        }

    def bind(self, *, model_fp: str, model_dir: str, imatrix_fp: str | None, imatrix_paths: list[str],
             quant_version: str, types: list[str], sample: float = 1.0) -> str:
        """Claim this db for a model (refusing another model's db); returns the run key results go under."""
        m = self.meta()
        if m.get("model_fingerprint") and m["model_fingerprint"] != model_fp:
            raise DBError(f"{self.path}: this database holds measurements of another model ({m.get('model_dir')}, "
                          f"fingerprint {m['model_fingerprint']}, this one is {model_fp}); use another --db file")
        key = run_key(model_fp, imatrix_fp, quant_version, sample)
        vals = {"schema_version": str(SCHEMA_VERSION), "model_fingerprint": model_fp, "model_dir": model_dir,
                "imatrix_fingerprint": imatrix_fp or "", "imatrix_paths": json.dumps(imatrix_paths),
                "quantizer_version": quant_version, "run_key": key, "types": json.dumps(types),
                "sample": str(sample)}
        with self._tx():
            self.con.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", vals.items())
        return key

    def put_tensors(self, rows: Iterable[tuple[str, tuple[int, ...], int, str, int | None, bool, str | None]]) -> None:
        with self._tx():
            self.con.executemany(
                "INSERT OR REPLACE INTO tensors(name, shape, n_params, cls, layer, quantizable, imatrix_coverage) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(n, json.dumps(list(s)), p, c, la, int(q), cov) for n, s, p, c, la, q, cov in rows])

    def tensors(self) -> list[dict[str, object]]:
        cur = self.con.execute("SELECT name, shape, n_params, cls, layer, quantizable, imatrix_coverage FROM tensors")
        return [{"name": n, "shape": tuple(json.loads(s)), "n_params": p, "cls": c, "layer": la,
                 "quantizable": bool(q), "imatrix_coverage": cov} for n, s, p, c, la, q, cov in cur.fetchall()]

    # --- results ---------------------------------------------------------------------------------------
    def _tx(self):
        con, path = self.con, self.path

        class _T:
            def __enter__(self_inner):
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, et, ev, tb):
                try:
                    con.execute("COMMIT" if et is None else "ROLLBACK")
                except sqlite3.OperationalError as e:
                    if _no_space(e, path):  # what was committed stays; the same command resumes from it
                        raise DBError(f"{path}: {NO_SPACE}") from None
                    raise

        return _T()

    def done(self, key: str) -> set[tuple[str, str]]:
        cur = self.con.execute("SELECT tensor, qtype FROM results WHERE run_key = ?", (key,))
        return set(cur.fetchall())

    def put_result(self, key: str, tensor: str, qtype: str, m: Measurement | None, seconds: float = 0.0) -> None:
        """One result, one transaction: after a kill it is either fully there or absent."""
        fp = result_fingerprint(key, qtype)
        if m is None:
            row = (key, tensor, qtype, fp, 0) + (None,) * 10 + (seconds, time.time(), 1.0)
        else:
            row = (key, tensor, qtype, fp, 1, m.n_params, m.n_bytes, m.bpw, m.rmse, m.max_abs_err, m.wmse, m.rel_err,
                   m.cos, m.tensor_class, m.layer, seconds, time.time(), m.sample)
        with self._tx():
            self.con.execute("INSERT OR REPLACE INTO results (run_key, tensor, qtype, fingerprint, applicable, n_params, "
                             "n_bytes, bpw, rmse, max_abs_err, wmse, rel_err, cos, tensor_class, layer, seconds, "
                             "created, sample) VALUES (" + ",".join("?" * 18) + ")", row)

    def measurements(self, key: str | None = None, *, include_na: bool = False) -> list[Measurement]:
        """Every applicable result of the latest run (or of `key`), as Measurement records."""
        key = key or self.meta().get("run_key")
        if key is None:
            return []
        # a read-only handle cannot migrate a database written before the `sample` column: those were exact
        has_sample = any(r[1] == "sample" for r in self.con.execute("PRAGMA table_info(results)"))
        cur = self.con.execute(
            "SELECT tensor, qtype, n_params, n_bytes, bpw, rmse, max_abs_err, wmse, rel_err, cos, tensor_class, layer, "
            f"{'sample' if has_sample else '1.0'}, applicable FROM results WHERE run_key = ? ORDER BY rowid", (key,))
        out = []
        for row in cur.fetchall():
            if not row[-1]:
                continue
            out.append(Measurement(*row[:-1]))
        return out

    def not_applicable(self, key: str | None = None) -> list[tuple[str, str]]:
        key = key or self.meta().get("run_key")
        return self.con.execute("SELECT tensor, qtype FROM results WHERE run_key = ? AND applicable = 0 ORDER BY rowid",
                                (key,)).fetchall()

    # --- export ----------------------------------------------------------------------------------------
    def export(self, out: str | os.PathLike, key: str | None = None) -> Path:
        """CSV or JSON (by suffix), written to a temp file and renamed."""
        out = Path(out)
        rows = [m.to_dict() for m in self.measurements(key)]
        if out.suffix.lower() == ".json":
            text = json.dumps({"model": self.model_info(), "measurements": rows,
                               "not_applicable": [list(t) for t in self.not_applicable(key)]}, indent=1)
        else:
            buf = io.StringIO(newline="")
            w = csv.DictWriter(buf, fieldnames=_MEAS_FIELDS)
            w.writeheader()
            w.writerows(rows)
            text = buf.getvalue()
        return write_atomic(out, text)
