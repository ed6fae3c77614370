"""Importance matrices: read llama.cpp's GGUF imatrix and legacy `.dat` files, combine several, write GGUF.

The value that matters is `Imatrix.importance(name)`: the float32 vector llama-quantize hands to
`ggml_quantize_chunk` for that tensor, derived the same way `tools/quantize` does it, so the converter's
quantization is bit-identical to llama-quantize's given the same file:

- GGUF files store raw sums of squared activations (`<name>.in_sum2`, float32, one row per expert) and token
  counts (`<name>.counts`, float32, one per expert). The loader rounds each count to an integer, and the value
  is `in_sum2 / float32(count)` in float32; an expert with count 0 (never routed to) gets all ones.
- Legacy `.dat` files store `(sum / count) * ncall` with one `ncall` per tensor; the value is
  `sums / float32(ncall)` when ncall > 0, else the stored sums unchanged.
- llama-quantize only uses an entry whose size equals n_per_row * n_expert (`importance_for` applies that rule).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from outputs import atomic_path, write_atomic

__all__ = [
    "ImatrixError", "ImatrixEntry", "Imatrix", "Coverage", "load_imatrix", "save_imatrix_gguf",
    "save_imatrix_dat", "COMBINE_MODES",
]

PathLike = str | os.PathLike
COMBINE_MODES = ("mean", "max", "weighted")
_GGUF_MAGIC = b"GGUF"
_SUM_SUFFIX = ".in_sum2"
_COUNT_SUFFIX = ".counts"


class ImatrixError(ValueError):
    """Unreadable, truncated or inconsistent imatrix file; the message names the file and the fix."""


@dataclass
class ImatrixEntry:
    """One tensor's statistics. sums: float32 (n_mat, n_per_row); counts: int64 (n_mat,).

    `legacy` entries hold `.dat` values ((sum/count)*ncall) with counts = [ncall] whatever n_mat is; their
    row split is unknown until the tensor's shape is (a legacy file stores only the flat length)."""

    sums: np.ndarray
    counts: np.ndarray
    legacy: bool = False

    @property
    def n_values(self) -> int:
        return int(self.sums.size)

    def values(self) -> np.ndarray:
        """The float32 importance llama-quantize derives (flat, length n_values)."""
        sums = self.sums.reshape(-1).astype(np.float32, copy=False)
        if self.legacy:
            ncall = int(self.counts[0]) if self.counts.size else 0
            if ncall > 0:
                return sums / np.float32(ncall)
            return sums.copy()
        n_mat = int(self.counts.size)
        rows = sums.reshape(n_mat, -1)
        cnt = self.counts.astype(np.float32)  # (float) int64, as the loader does
        out = np.ones_like(rows)
        live = cnt > 0
        out[live] = rows[live] / cnt[live][:, None]
        return out.reshape(-1)


@dataclass(frozen=True)
class Coverage:
    """How much calibration data reached a tensor: per-expert token counts and which experts got none."""

    name: str
    n_mat: int
    counts: tuple[int, ...]
    zero: tuple[int, ...]      # indices (experts) with count 0: llama-quantize uses all-ones importance there
    legacy: bool = False

    @property
    def partial(self) -> bool:
        return 0 < len(self.zero) < self.n_mat

    @property
    def empty(self) -> bool:
        return len(self.zero) == self.n_mat

    @property
    def fraction(self) -> float:
        return (self.n_mat - len(self.zero)) / self.n_mat if self.n_mat else 0.0

    def describe(self) -> str:
        if self.empty:
            return "no data"
        if self.n_mat == 1:
            return f"{self.counts[0]} tokens" if not self.legacy else f"{self.counts[0]} calls"
        s = f"{self.n_mat - len(self.zero)}/{self.n_mat} experts, min {min(self.counts)} max {max(self.counts)} tokens"
        if self.zero:
            s += f" (never routed: {','.join(map(str, self.zero[:8]))}{'...' if len(self.zero) > 8 else ''})"
        return s


@dataclass
class Imatrix:
    """Importance statistics keyed by GGUF tensor name, as llama-quantize would load them."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    paths: list[Path] = field(default_factory=list)

    # --- queries -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def chunks(self) -> int:
        return self.chunk_count

    @property
    def dataset(self) -> str | None:
        return self.datasets[-1] if self.datasets else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def importance(self, name: str) -> np.ndarray | None:
        """float32 (n_per_row,) for dense tensors, (n_expert, n_per_row) for per-expert GGUF entries; None if absent.

        Legacy entries come back flat (their expert split is only known from the tensor shape: `importance_for`)."""
        e = self.entries.get(name)
        if e is None:
            return None
        v = e.values()
        if not e.legacy and e.counts.size > 1:
            return v.reshape(e.counts.size, -1)
        return v

    def importance_for(self, name: str, shape: Sequence[int]) -> np.ndarray | None:
        """Importance for a tensor of GGUF-layout `shape` (numpy order: (..., n_per_row)), as llama-quantize applies it.

        Returns (n_per_row,) for 2-D tensors, (n_expert, n_per_row) for 3-D ones, or None when the imatrix has no
        entry (llama-quantize then quantizes without). A size mismatch is an error (llama-quantize aborts), except
        for token_embd, which llama-quantize silently quantizes without importance."""
        e = self.entries.get(name)
        if e is None:
            return None
        n_per_row = int(shape[-1])
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if e.n_values != n_per_row * n_mat:
            if _is_token_embd(name):
                return None
            where = ", ".join(str(p) for p in self.paths) or "imatrix"
            raise ImatrixError(
                f"{where}: entry {name!r} has {e.n_values} values but the tensor needs {n_per_row * n_mat} "
                f"(shape {tuple(shape)}); the imatrix was computed for another model")
        v = e.values()
        return v.reshape(n_mat, n_per_row) if n_mat > 1 else v

    def coverage(self, name: str) -> Coverage | None:
        e = self.entries.get(name)
        if e is None:
            return None
        counts = tuple(int(c) for c in e.counts)
        if e.legacy:
            return Coverage(name, 1, counts, tuple(i for i, c in enumerate(counts) if c <= 0), legacy=True)
        return Coverage(name, len(counts), counts, tuple(i for i, c in enumerate(counts) if c == 0))

    def coverage_report(self) -> list[Coverage]:
        return [c for n in self.names() if (c := self.coverage(n)) is not None]

    def flagged(self) -> list[Coverage]:
        """Entries with zero or partial counts (MoE experts never routed to, tensors never reached)."""
        return [c for c in self.coverage_report() if c.zero]

    def check_model(self, tensors: Iterable[tuple[str, Sequence[int]]]) -> list[str]:
        """Raise if this imatrix does not belong to a model with these (name, shape)s; returns names it lacks.

        Refuses when no entry matches any tensor name or any entry's size disagrees (another model)."""
        shapes = {n: tuple(s) for n, s in tensors}
        where = ", ".join(str(p) for p in self.paths) or "imatrix"
        known = [n for n in self.entries if n in shapes]
        if self.entries and not known:
            raise ImatrixError(f"{where}: none of its {len(self.entries)} entries names a tensor of this model "
                               f"(e.g. {self.names()[0]!r}); it was computed for another model")
        for n in known:
            self.importance_for(n, shapes[n])
        return [n for n in shapes if n not in self.entries]

    def fingerprint(self) -> str:
        """Content hash of what quantization uses (names and derived values), independent of file layout."""
        import hashlib

        h = hashlib.sha256()
        for n in self.names():
            h.update(n.encode() + b"\0")
            h.update(np.ascontiguousarray(self.entries[n].values(), dtype="<f4").tobytes())
        return h.hexdigest()[:16]


def _is_token_embd(name: str) -> bool:
    return name.startswith("token_embd.") or name == "token_embd"


# --- reading -------------------------------------------------------------------------------------------

def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on truncated or corrupt files
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({type(exc).__name__}: {exc}); "
                           f"the file is truncated or corrupt, recompute it with llama-imatrix") from None

    def field_str_list(key: str) -> list[str] | None:
        f = reader.fields.get(key)
        if f is None:
            return None
        val = f.contents()
        return [str(v) for v in val] if isinstance(val, list) else [str(val)]

    def field_int(key: str) -> int | None:
        f = reader.fields.get(key)
        return None if f is None else int(f.contents())

    file_size = path.stat().st_size
    datasets = field_str_list("imatrix.datasets")
    chunk_count = field_int("imatrix.chunk_count")
    chunk_size = field_int("imatrix.chunk_size")
    if datasets is None or chunk_count is None or chunk_size is None:
        raise ImatrixError(f"{path}: GGUF file without imatrix metadata (imatrix.datasets/chunk_count/chunk_size); "
                           f"llama-quantize refuses it too. Is it a model file rather than an imatrix?")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = t.name
        if name.endswith(_SUM_SUFFIX):
            target, base = sums, name[: -len(_SUM_SUFFIX)]
        elif name.endswith(_COUNT_SUFFIX):
            target, base = counts, name[: -len(_COUNT_SUFFIX)]
        else:
            continue
        if t.tensor_type != GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {name!r} is {t.tensor_type.name}, imatrix sums and counts must be F32")
        n_expected = int(np.prod([int(x) for x in t.shape]))
        try:
            data = np.array(t.data, dtype=np.float32).reshape(-1)
        except Exception:
            data = np.zeros(0, np.float32)
        if data.size != n_expected or int(t.data_offset) + 4 * n_expected > file_size:
            raise ImatrixError(f"{path}: data of {name!r} is cut off; the file is truncated, recompute it")
        target[base] = data
    align = field_int("general.alignment") or 32
    end = max((int(t.data_offset) + -(-int(t.n_bytes) // align) * align for t in reader.tensors), default=0)
    if end > file_size:  # llama.cpp reads the padded data blob whole and refuses a short one
        raise ImatrixError(f"{path}: file ends {end - file_size} bytes early; it is truncated, recompute it")
    if not sums and not counts:
        raise ImatrixError(f"{path}: no imatrix entries (.in_sum2/.counts tensors); recompute it with llama-imatrix")
    entries: dict[str, ImatrixEntry] = {}
    for base in sorted(set(sums) | set(counts)):
        if base not in sums or base not in counts:
            raise ImatrixError(f"{path}: mismatched sums and counts for {base!r} (one of .in_sum2/.counts missing)")
        s, c = sums[base], counts[base]
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{path}: {base!r} has {s.size} sums for {c.size} counts; the file is corrupt")
        if not np.isfinite(s).all():
            raise ImatrixError(f"{path}: {base!r} has NaN/Inf sums; llama-quantize would refuse it, recompute it")
        ci = np.floor(np.abs(c.astype(np.float64)) + 0.5) * np.sign(c)  # lround: half away from zero
        entries[base] = ImatrixEntry(s.reshape(c.size, -1), ci.astype(np.int64))
    return Imatrix(entries, datasets, chunk_count, chunk_size, is_legacy=False, paths=[path])


def _read_dat(path: Path) -> Imatrix:
    buf = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise ImatrixError(f"{path}: truncated legacy imatrix (ends while reading {what} at byte {pos}); "
                               f"recompute it with llama-imatrix")
        out = buf[pos:pos + n]
        pos += n
        return out

    if len(buf) < 4:
        raise ImatrixError(f"{path}: empty or truncated imatrix file ({len(buf)} bytes); recompute it with llama-imatrix")
    (n_entries,) = struct.unpack("<i", take(4, "entry count"))
    if n_entries < 1 or n_entries > len(buf) // 12:
        raise ImatrixError(f"{path}: neither a GGUF nor a legacy .dat imatrix (entry count {n_entries}); "
                           f"pass an imatrix written by llama-imatrix")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        (ln,) = struct.unpack("<i", take(4, f"name length of entry {i + 1}"))
        if ln < 0 or ln > 4096:
            raise ImatrixError(f"{path}: corrupt legacy imatrix (entry {i + 1} name length {ln})")
        try:
            name = take(ln, f"name of entry {i + 1}").decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixError(f"{path}: corrupt legacy imatrix (entry {i + 1} name is not UTF-8)") from None
        ncall, nval = struct.unpack("<ii", take(8, f"header of {name!r}"))
        if nval < 1:
            raise ImatrixError(f"{path}: corrupt legacy imatrix ({name!r} has {nval} values)")
        vals = np.frombuffer(take(4 * nval, f"values of {name!r}"), dtype="<f4").astype(np.float32)
        if not np.isfinite(vals).all():
            raise ImatrixError(f"{path}: {name!r} has NaN/Inf values; llama-quantize would refuse it, recompute it")
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64), legacy=True)
    chunk_count, datasets = 0, []
    if pos < len(buf):  # optional trailer: chunk count, dataset name
        if pos + 4 <= len(buf):
            (chunk_count,) = struct.unpack("<i", buf[pos:pos + 4])
            pos += 4
            if pos + 4 <= len(buf):
                (ln,) = struct.unpack("<i", buf[pos:pos + 4])
                pos += 4
                if 0 < ln <= len(buf) - pos:
                    datasets = [buf[pos:pos + ln].decode("utf-8", errors="replace")]
    return Imatrix(entries, datasets, chunk_count, 0, is_legacy=True, paths=[path])


def _read_one(path: Path) -> Imatrix:
    if not path.is_file():
        raise ImatrixError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == _GGUF_MAGIC:
        return _read_gguf(path)
    return _read_dat(path)


# --- combining -----------------------------------------------------------------------------------------

def _raw(e: ImatrixEntry, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums (n_mat, n), counts (n_mat,)) in raw token units; legacy values rescaled as llama-imatrix does."""
    if not e.legacy:
        return e.sums.astype(np.float64), e.counts.astype(np.float64)
    vals = e.sums.reshape(1, -1).astype(np.float64)
    return vals * chunk_size, np.array([float(e.counts[0]) * chunk_size])


def _combine(mats: list[Imatrix], mode: str) -> Imatrix:
    chunk_size = next((m.chunk_size for m in mats if m.chunk_size > 0), 512)
    names = sorted(set().union(*(m.entries for m in mats)))
    entries: dict[str, ImatrixEntry] = {}
    for name in names:
        parts = [(m, m.entries[name]) for m in mats if name in m.entries]
        sizes = {e.n_values for _, e in parts}
        if len(sizes) > 1:
            desc = ", ".join(f"{m.paths[0]}: {e.n_values}" for m, e in parts)
            raise ImatrixError(f"cannot combine imatrix files: {name!r} has different sizes ({desc}); "
                               f"they were computed for different models")
        n_mat = max(e.counts.size if not e.legacy else 1 for _, e in parts)
        raws = []
        for _, e in parts:
            s, c = _raw(e, chunk_size)
            if c.size == 1 and n_mat > 1:  # a dense/legacy count broadcasts over experts, as llama-imatrix does
                s, c = s.reshape(n_mat, -1), np.repeat(c, n_mat)
            raws.append((s.reshape(n_mat, -1), c))
        tot_c = np.sum([c for _, c in raws], axis=0)
        if mode == "weighted":  # sum of raw sums and counts: what `llama-imatrix --in-file a --in-file b` does
            tot_s = np.sum([s for s, _ in raws], axis=0)
        else:
            vals = np.stack([np.where(c[:, None] > 0, s / np.maximum(c, 1)[:, None], np.nan) for s, c in raws])
            with np.errstate(all="ignore"), _nan_ok():
                agg = np.nanmean(vals, axis=0) if mode == "mean" else np.nanmax(vals, axis=0)
            agg = np.nan_to_num(agg, nan=0.0)
            tot_s = agg * tot_c[:, None]  # stored so that sums/counts reproduces the combined value
        entries[name] = ImatrixEntry(tot_s.astype(np.float32), np.rint(tot_c).astype(np.int64))
    datasets = [d for m in mats for d in m.datasets]
    chunk_count = sum(m.chunk_count for m in mats)
    return Imatrix(entries, datasets, chunk_count, chunk_size, is_legacy=False,
                   paths=[p for m in mats for p in m.paths])


class _nan_ok:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)


def load_imatrix(paths: Sequence[PathLike] | PathLike, combine: str = "mean") -> Imatrix:
    """Read one or more imatrix files (GGUF or legacy .dat, detected by content) and combine them.

    One file is returned as stored (importance() is then exactly llama-quantize's). Several are combined per
    entry and per expert: "weighted" sums raw sums and token counts (= llama-imatrix --in-file, i.e. weighted by
    how much data each saw), "mean"/"max" take the mean/max of each file's normalised values, skipping experts a
    file never routed to."""
    if combine not in COMBINE_MODES:
        raise ImatrixError(f"unknown combine mode {combine!r}; use one of {', '.join(COMBINE_MODES)}")
    plist = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not plist:
        raise ImatrixError("no imatrix file given")
    mats = [_read_one(p) for p in plist]
    if len(mats) == 1:
        return mats[0]
    return _combine(mats, combine)


# --- writing -------------------------------------------------------------------------------------------

def _writer_class():
    """gguf-py's writer, able to write an empty string array (llama-imatrix does when no dataset is known)."""
    import gguf

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):  # type: ignore[override]
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return _Writer


def save_imatrix_gguf(path: PathLike, imatrix: Imatrix | dict[str, ImatrixEntry], *,
                      datasets: Sequence[str] | None = None, chunk_count: int | None = None,
                      chunk_size: int | None = None) -> Path:
    """Write llama.cpp's GGUF imatrix format (general.type=imatrix, `<name>.in_sum2` (n, n_mat) and
    `<name>.counts` (1, n_mat) float32, sorted by name), via a temp file renamed into place.

    Legacy entries are converted to raw form the way llama-imatrix does when it reads a .dat file."""
    import gguf

    path = Path(path)
    if isinstance(imatrix, Imatrix):
        entries = imatrix.entries
        datasets = list(imatrix.datasets) if datasets is None else list(datasets)
        chunk_count = imatrix.chunk_count if chunk_count is None else chunk_count
        chunk_size = imatrix.chunk_size if chunk_size is None else chunk_size
    else:
        entries = imatrix
    datasets = list(datasets or [])
    chunk_count = int(chunk_count or 0)
    chunk_size = int(chunk_size or 0)
    with atomic_path(path) as tmp:
        w = _writer_class()(tmp, arch="imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture key
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_key_value(gguf.Keys.IMatrix.DATASETS, datasets, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name in sorted(entries):
            s, c = _raw(entries[name], chunk_size or 512)
            n_mat = c.size
            w.add_tensor(name + _SUM_SUFFIX, s.astype(np.float32).reshape(n_mat, -1))
            w.add_tensor(name + _COUNT_SUFFIX, c.astype(np.float32).reshape(n_mat, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def save_imatrix_dat(path: PathLike, imatrix: Imatrix) -> Path:
    """Write the legacy .dat format ((sum/count)*ncall per entry, ncall = ceil(max count / chunk_size)),
    for tools that predate the GGUF imatrix; zero-count experts store 1 as llama-imatrix does."""
    path = Path(path)
    chunk_size = imatrix.chunk_size or 512
    out = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        if e.legacy:
            ncall, vals = int(e.counts[0]), e.sums.reshape(-1).astype(np.float32)
        else:
            ncall = int((int(e.counts.max()) + chunk_size - 1) // chunk_size)
            cnt = e.counts.astype(np.float32)
            rows = e.sums.astype(np.float32).reshape(e.counts.size, -1)
            live = cnt > 0
            norm = np.ones_like(rows)
            norm[live] = rows[live] / cnt[live][:, None]
            vals = (norm * np.float32(ncall)).reshape(-1)
        nb = name.encode()
        out += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", ncall, vals.size), vals.astype("<f4").tobytes()]
    ds = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(ds)), ds]
    write_atomic(path, b"".join(out))
    return path


