"""Job kinds: how each pipeline stage is run as a subprocess, and how its output lines become progress.

Each stage keeps its own CLI; a kind is only (params -> argv) plus a progress parser, so stages stay decoupled
and a killed worker loses nothing a stage has already saved (measurement resumes from its own db, a download
from its partial files). Paths in params are relative to the workspace (absolute paths are used as given).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_PROGRESS = re.compile(r"^PROGRESS\s+([0-9.]+)\s*(.*)$")
_FRACTION = re.compile(r"(?:^|[\s\[(])(\d+)\s*/\s*(\d+)(?=[\s\])\]:,]|$)")
_PERCENT = re.compile(r"(?:^|\s)(\d{1,3}(?:\.\d+)?)\s*%")


class ParamError(ValueError):
    """Job parameters that cannot make a command (missing model, unknown option); shown to the user as is."""


def parse_progress(line: str) -> tuple[float | None, str | None]:
    """(fraction, message) from one output line, or (None, None) when it carries no progress.

    Understands `PROGRESS 0.42 message` (our stages' explicit protocol), `[12/345] ...` counters and `42%`.
    """
    s = line.strip()
    if not s:
        return None, None
    m = _PROGRESS.match(s)
    if m:
        try:
            return float(m.group(1)), m.group(2).strip() or None
        except ValueError:
            return None, None
    m = _FRACTION.search(s)
    if m:
        done, total = int(m.group(1)), int(m.group(2))
        if 0 < total and done <= total:
            return done / total, s[:200]
    m = _PERCENT.search(s)
    if m and float(m.group(1)) <= 100:
        return float(m.group(1)) / 100.0, s[:200]
    return None, None


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # what the job produces, for the UI (workspace-relative)


@dataclass
class Kind:
    name: str
    build: Callable[[dict[str, Any], Path], Command]
    resumable: bool
    needs_token: bool = False
    description: str = ""


def _path(ws: Path, p: Any, what: str) -> Path:
    if not isinstance(p, str) or not p.strip():
        raise ParamError(f"missing parameter {what!r} (a path relative to the workspace {ws})")
    q = Path(p)
    return q if q.is_absolute() else ws / q


def _rel(ws: Path, p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ws.resolve()))
    except ValueError:
        return str(p)


def _py(*args: str) -> list[str]:
    return [sys.executable, "-u", *args]


def _opt(argv: list[str], flag: str, value: Any) -> None:
    if value is not None and value != "":
        argv += [flag, str(value)]


# --------------------------------------------------------------------------------------------- kinds
def _download(p: dict[str, Any], ws: Path) -> Command:
    repo = p.get("repo_id")
    if not isinstance(repo, str) or not repo.strip():
        raise ParamError("missing parameter 'repo_id' (e.g. HuggingFaceTB/SmolLM2-135M)")
    local = p.get("local_dir") or f"models/{repo.strip().replace('/', '__')}"
    out = _path(ws, local, "local_dir")
    argv = _py("-m", "hub", "download", repo.strip(), "--local-dir", str(out))
    _opt(argv, "--revision", p.get("revision"))
    return Command(argv, outputs={"model": _rel(ws, out)})


def _measure(p: dict[str, Any], ws: Path) -> Command:
    model = _path(ws, p.get("model"), "model")
    db = _path(ws, p.get("db") or f"measurements/{model.name}.sqlite", "db")
    db.parent.mkdir(parents=True, exist_ok=True)
    argv = _py("-m", "measure", str(model), "--db", str(db))
    if p.get("imatrix"):
        _opt(argv, "--imatrix", _path(ws, p["imatrix"], "imatrix"))
    if p.get("hessian"):  # input covariances: the error-compensated encoding (docs/compensation.md)
        _opt(argv, "--hessian", _path(ws, p["hessian"], "hessian"))
    if p.get("types"):
        _opt(argv, "--types", ",".join(p["types"]) if isinstance(p["types"], list) else p["types"])
    _opt(argv, "--workers", p.get("workers"))
    return Command(argv, outputs={"db": _rel(ws, db)})


def _imatrix(p: dict[str, Any], ws: Path) -> Command:
    model = _path(ws, p.get("model"), "model")
    out = _path(ws, p.get("output") or f"measurements/{model.name}.imatrix.gguf", "output")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _path(ws, p.get("text") or "texts/calibration.txt", "text")
    argv = _py("-m", "measure", "imatrix", str(model), "-o", str(out), "--text", str(text))
    _opt(argv, "--ctx", p.get("ctx"))
    _opt(argv, "--chunks", p.get("chunks"))
    outputs = {"imatrix": _rel(ws, out)}
    if p.get("hessian"):  # also the input covariances (the path to write them to)
        cov = _path(ws, p["hessian"], "hessian")
        cov.parent.mkdir(parents=True, exist_ok=True)
        _opt(argv, "--hessian", cov)
        outputs["hessian"] = _rel(ws, cov)
    return Command(argv, outputs=outputs)


def _strategy(p: dict[str, Any], ws: Path) -> Command:
    db = _path(ws, p.get("db"), "db")
    out = _path(ws, p.get("output") or f"strategies/{db.stem}.yaml", "output")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = _py("-m", "strategy", "build", "--db", str(db), "-o", str(out))
    if p.get("model"):
        _opt(argv, "--model", _path(ws, p["model"], "model"))
    if p.get("target_size"):
        _opt(argv, "--target-size", p["target_size"])
    elif p.get("target_bpw"):
        _opt(argv, "--target-bpw", p["target_bpw"])
    else:
        argv.append("--knee")
    _opt(argv, "--method", p.get("method"))
    if p.get("imatrix"):
        _opt(argv, "--imatrix", _path(ws, p["imatrix"], "imatrix"))
    if p.get("hessian"):
        _opt(argv, "--hessian", _path(ws, p["hessian"], "hessian"))
    return Command(argv, outputs={"strategy": _rel(ws, out)})


def _convert(p: dict[str, Any], ws: Path) -> Command:
    """With a strategy: the mixed GGUF. Without one: a uniform file (outtype, e.g. bf16 for verify's base)."""
    model = _path(ws, p.get("model"), "model")
    plan = _path(ws, p["strategy"], "strategy") if p.get("strategy") else None
    tag = plan.stem if plan else str(p.get("outtype") or "bf16").lower()
    out = _path(ws, p.get("outfile") or f"gguf/{model.name}-{tag}.gguf", "outfile")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = _py(str(ROOT / "convert_hf_to_gguf_strategy.py"), str(model), "--outfile", str(out))
    if plan:
        argv += ["--strategy", str(plan)]
    if p.get("outtype") or not plan:
        argv += ["--outtype", str(p.get("outtype") or "bf16")]
    if p.get("imatrix"):
        _opt(argv, "--imatrix", _path(ws, p["imatrix"], "imatrix"))
    if p.get("hessian"):
        _opt(argv, "--hessian", _path(ws, p["hessian"], "hessian"))
    return Command(argv, outputs={"gguf": _rel(ws, out)})


def _verify(p: dict[str, Any], ws: Path) -> Command:
    base = _path(ws, p.get("base"), "base")
    cands = p.get("candidates")
    cands = [cands] if isinstance(cands, str) else list(cands or [])
    if not cands:
        raise ParamError("missing parameter 'candidates' (GGUF files to compare with the base)")
    text = _path(ws, p.get("text") or "texts/evaluation.txt", "text")
    out = _path(ws, p.get("output") or f"verify/{base.stem}", "output")
    argv = _py("-m", "verify", "--base", str(base), "--text", str(text), "-o", str(out),
               *[str(_path(ws, c, "candidates")) for c in cands])
    _opt(argv, "--ctx", p.get("ctx"))
    _opt(argv, "--chunks", p.get("chunks"))
    _opt(argv, "--engine", p.get("engine"))
    if p.get("model_dir"):
        _opt(argv, "--model-dir", _path(ws, p["model_dir"], "model_dir"))
    return Command(argv, outputs={"report": _rel(ws, out / "results.json")})


def _smooth(p: dict[str, Any], ws: Path) -> Command:
    """The smoothed checkpoint (docs/smoothing.md) and its imatrix; later jobs take them as model and imatrix."""
    model = _path(ws, p.get("model"), "model")
    imatrix = _path(ws, p.get("imatrix"), "imatrix")
    out = _path(ws, p.get("output") or f"models/{model.name}-smooth", "output")
    im_out = _path(ws, p.get("imatrix_out") or f"measurements/{out.name}.imatrix.gguf", "imatrix_out")
    im_out.parent.mkdir(parents=True, exist_ok=True)
    argv = _py("-m", "measure", "smooth", str(model), "--imatrix", str(imatrix), "-o", str(out),
               "--imatrix-out", str(im_out))
    _opt(argv, "--alpha", p.get("alpha"))
    if p.get("order_text"):  # also reorder the hidden channels, statistics from this calibration text
        _opt(argv, "--order-text", _path(ws, p["order_text"], "order_text"))
    return Command(argv, outputs={"model": _rel(ws, out), "imatrix": _rel(ws, im_out)})


def _tune(p: dict[str, Any], ws: Path) -> Command:
    """The converted file with its block scales and norms fitted end to end (docs/tuning.md)."""
    gguf = _path(ws, p.get("gguf"), "gguf")
    base = _path(ws, p.get("base"), "base")
    texts = p.get("texts") or p.get("text") or "texts/calibration.txt"
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = _path(ws, p.get("output") or f"gguf/{gguf.stem}-tuned.gguf", "output")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = _py("-m", "tune", str(gguf), "--base", str(base), "-o", str(out))
    for t in texts:
        argv += ["--text", str(_path(ws, t, "texts"))]
    for key in ("steps", "lr", "chunks", "val_chunks", "ctx", "what", "code_lr"):
        _opt(argv, "--" + key.replace("_", "-"), p.get(key))
    return Command(argv, outputs={"gguf": _rel(ws, out)})


KINDS: dict[str, Kind] = {
    "download": Kind("download", _download, resumable=True, needs_token=True,
                     description="download a Hugging Face repo (only the files conversion needs)"),
    "imatrix": Kind("imatrix", _imatrix, resumable=False, description="importance matrix from calibration text"),
    "smooth": Kind("smooth", _smooth, resumable=False,
                   description="exact reparametrisation: cheaper 8-bit activation rounding in llama.cpp"),
    "measure": Kind("measure", _measure, resumable=True, description="per-tensor error for every type"),
    "strategy": Kind("strategy", _strategy, resumable=False, description="choose a type per tensor"),
    "convert": Kind("convert", _convert, resumable=False, description="write the mixed-precision GGUF"),
    "tune": Kind("tune", _tune, resumable=False,
                 description="fit a converted file's block scales, norms (and codes) end to end (same types and size)"),
    "verify": Kind("verify", _verify, resumable=False, description="KLD of GGUFs against the original"),
}


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ParamError(f"unknown job kind {name!r}; choose from {', '.join(KINDS)}")
    return KINDS[name]
