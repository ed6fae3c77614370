"""The web UI server: static pages plus a JSON API under /api/, all confined to one workspace folder.

Stdlib only (ThreadingHTTPServer), bound to 127.0.0.1 by default. Long work never runs in the server: it is
queued as a job (jobs/) that a separate worker process runs, so the UI can be closed or killed at any time.
Every path the browser sends is relative to the workspace and is resolved (symlinks included) before use;
anything that lands outside is refused. Handlers turn every exception into a JSON error: a bad request can
never take the server down.
"""

from __future__ import annotations

import json
import mimetypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from jobs.kinds import KINDS, ROOT, ParamError
from jobs.store import JobError, JobStore
from jobs.worker import worker_alive
from outputs import is_disk_full, os_error_line

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 32 * 1024 * 1024
PATH_PARAMS = ("model", "db", "strategy", "output", "outfile", "local_dir", "imatrix", "text", "texts", "base", "gguf",
               "model_dir", "candidates", "hessian")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class App:
    """Workspace state shared by request handlers (thread-safe: the store opens a connection per call)."""

    def __init__(self, workspace: str | Path, start_worker: bool = True):
        self.workspace = Path(workspace).expanduser().resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        for d in ("models", "measurements", "strategies", "gguf", "verify", "texts"):
            (self.workspace / d).mkdir(exist_ok=True)
        for name in ("calibration.txt", "evaluation.txt"):  # bundled texts, so imatrix/verify work out of the box
            src, dst = ROOT / "tests" / "data" / name, self.workspace / "texts" / name
            if src.exists() and not dst.exists():
                shutil.copyfile(src, dst)
        self.store = JobStore(self.workspace / "jobs" / "jobs.sqlite")
        self.worker: subprocess.Popen | None = None
        self._tensor_cache: dict[tuple, list[dict]] = {}
        self._lock = threading.Lock()
        if start_worker:
            self.ensure_worker()

    # ------------------------------------------------------------------ worker
    def ensure_worker(self) -> int | None:
        """Start a worker for this workspace unless one is alive (it outlives a killed UI on purpose)."""
        with self._lock:
            if self.worker is not None and self.worker.poll() is None:
                return self.worker.pid  # ours, possibly still starting up (not holding its lock yet)
            pid = worker_alive(self.store)
            if pid:
                return pid
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "jobs", "--workspace", str(self.workspace), "worker"], cwd=str(ROOT),
                stdin=subprocess.DEVNULL, stdout=open(self.store.path.parent / "worker.log", "ab"),  # noqa: SIM115
                stderr=subprocess.STDOUT, start_new_session=True)
            return self.worker.pid

    def close(self) -> None:
        """A clean UI exit stops the worker it started; running jobs are re-queued and resume next time."""
        if self.worker and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()

    # ------------------------------------------------------------------ paths
    def resolve(self, rel: Any, what: str = "path", must_exist: bool = False) -> Path:
        """A workspace-relative (or absolute-inside) path, symlinks resolved; outside the workspace -> 403."""
        if not isinstance(rel, str) or not rel.strip():
            raise ApiError(400, f"missing {what}: give a path inside the workspace {self.workspace}")
        if "\0" in rel:
            raise ApiError(400, f"{what}: invalid character in path")
        p = Path(rel.strip())
        full = (p if p.is_absolute() else self.workspace / p).resolve()
        if full != self.workspace and self.workspace not in full.parents:
            raise ApiError(403, f"{what} {rel!r} is outside the workspace {self.workspace}; copy or move it under "
                                "the workspace, or restart with --workspace pointing at a folder that contains it")
        if must_exist and not full.exists():
            raise ApiError(404, f"{what} {rel!r} not found in the workspace {self.workspace}")
        return full

    def rel(self, p: Path) -> str:
        try:
            return str(p.resolve().relative_to(self.workspace))
        except ValueError:
            return str(p)

    # ------------------------------------------------------------------ api
    def info(self) -> dict:
        from quants import WRITABLE_TYPES
        from strategy.sizes import bits_per_weight

        try:
            from gguf.constants import GGML_QUANT_SIZES
        except ImportError:  # pragma: no cover
            GGML_QUANT_SIZES = {}
        types = [{"name": t.name, "bpw": bits_per_weight(t.name), "block": GGML_QUANT_SIZES[t][0],
                  "bytes": GGML_QUANT_SIZES[t][1]} for t in WRITABLE_TYPES]
        types.sort(key=lambda t: t["bpw"])
        stages = {"catalog": _has_module("catalog"), "measure": _has_module("measure.db"),
                  "strategy": _has_module("strategy.build"),
                  "convert": (ROOT / "convert_hf_to_gguf_strategy.py").exists(),
                  "verify": _has_module("verify.pipeline")}
        return {"workspace": str(self.workspace), "kinds": sorted(KINDS), "stages": stages, "types": types,
                "worker": worker_alive(self.store)}

    def list_files(self, rel: str, exts: list[str] | None) -> dict:
        d = self.resolve(rel or ".", "folder", must_exist=True)
        if not d.is_dir():
            raise ApiError(400, f"{rel!r} is not a folder")
        out = []
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            try:
                inside = self.resolve(self.rel(p))
            except ApiError:
                continue  # a symlink leading out of the workspace is not listed
            is_dir = inside.is_dir()
            if exts and not is_dir and not any(p.name.lower().endswith(e) for e in exts):
                continue
            out.append({"name": p.name, "path": self.rel(p), "dir": is_dir,
                        "size": inside.stat().st_size if not is_dir else None})
        return {"path": self.rel(d), "entries": out}

    def models(self) -> list[dict]:
        out = []
        for cfg in sorted(self.workspace.rglob("config.json")):
            if len(cfg.relative_to(self.workspace).parts) > 4 or "/." in str(cfg):
                continue
            d = cfg.parent
            try:
                self.resolve(self.rel(d))
            except ApiError:
                continue
            weights = sorted(p.name for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
            if weights:
                out.append({"path": self.rel(d), "name": d.name, "weights": len(weights),
                            "bytes": sum((d / w).stat().st_size for w in weights)})
        return out

    def open_model(self, rel: str) -> dict:
        d = self.resolve(rel, "model folder", must_exist=True)
        if not d.is_dir():
            raise ApiError(400, f"{rel!r} is not a folder: pick the folder holding config.json and the weights")
        if not (d / "config.json").exists():
            raise ApiError(400, f"{self.rel(d)}: no config.json here; pick the folder of a Hugging Face checkpoint "
                                "(config.json, tokenizer files, *.safetensors)")
        if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in d.iterdir()):
            raise ApiError(400, f"{self.rel(d)}: no *.safetensors weights here; download the model first")
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        return {"path": self.rel(d), "name": d.name, "architectures": cfg.get("architectures") or [],
                "model_type": cfg.get("model_type")}

    def tensors(self, model_rel: str, imatrix_rel: str | None) -> dict:
        d = self.resolve(model_rel, "model folder", must_exist=True)
        try:
            import catalog
        except ImportError:
            raise ApiError(501, "the tensor catalog stage (catalog/) is not installed in this checkout") from None
        key = (str(d), max((p.stat().st_mtime for p in d.iterdir()), default=0))
        if key not in self._tensor_cache:
            try:
                infos = catalog.list_tensors(d)
            except Exception as e:  # noqa: BLE001 - the catalog's user errors are one line
                raise ApiError(400, f"{self.rel(d)}: {e}") from None
            self._tensor_cache[key] = [
                {"name": t.name, "shape": list(t.shape), "n_params": int(t.n_params), "cls": t.cls,
                 "layer": t.layer, "quantizable": bool(t.quantizable), "fixed_type": t.fixed_type,
                 "source_dtype": t.source_dtype} for t in infos]
        rows = [dict(r) for r in self._tensor_cache[key]]
        cov_note = None
        if imatrix_rel:
            cov = self.imatrix_coverage(self.resolve(imatrix_rel, "imatrix", must_exist=True))
            for r in rows:
                r["imatrix"] = (cov.get(r["name"]) or {"fraction": 0.0, "text": "not in imatrix"}) \
                    if r["quantizable"] else None
            cov_note = f"{sum(1 for r in rows if r.get('imatrix') and r['imatrix']['fraction'] > 0)} of {sum(r['quantizable'] for r in rows)} " \
                       "quantizable tensors have importance data"
        return {"model": self.rel(d), "tensors": rows, "imatrix_note": cov_note}

    def imatrix_coverage(self, path: Path) -> dict[str, dict]:
        """Per tensor: fraction of its matrices (experts) that calibration data reached, and a description."""
        try:
            from measure.imatrix import ImatrixError, load_imatrix
        except ImportError:
            raise ApiError(501, "reading an imatrix needs measure.imatrix (not installed in this checkout)") from None
        try:
            im = load_imatrix(path)
        except (ImatrixError, OSError, ValueError) as e:
            raise ApiError(400, f"{self.rel(path)}: {e}") from None
        return {c.name: {"fraction": c.fraction, "text": c.describe()} for c in im.coverage_report()}

    def measurements(self, db_rel: str, plan_rel: str | None = None) -> dict:
        import numpy as np

        db = self.resolve(db_rel, "measurement db", must_exist=True)
        try:
            from strategy.build import load_measurements
            from strategy.knee import knee_index, pareto_order
            from strategy.problem import StrategyError
        except ImportError:
            raise ApiError(501, "the strategy stage (strategy/) is not installed in this checkout") from None
        try:
            rows = load_measurements(db)
        except StrategyError as e:
            raise ApiError(400, str(e)) from None
        plan = self.load_plan(plan_rel) if plan_rel else None
        per: dict[str, dict] = {}
        for m in rows:
            t = per.setdefault(m.tensor, {"name": m.tensor, "cls": m.tensor_class, "layer": m.layer,
                                          "n_params": m.n_params, "points": []})
            t["points"].append({"type": m.qtype, "bpw": m.bpw, "wmse": m.wmse, "rel_err": m.rel_err,
                                "rmse": m.rmse, "cos": m.cos, "bytes": m.n_bytes})
        for t in per.values():
            t["points"].sort(key=lambda p: p["bpw"])
            bpw = np.array([p["bpw"] for p in t["points"]])
            err = np.array([p["wmse"] for p in t["points"]])
            keep = pareto_order(bpw, err)
            t["knee"] = t["points"][int(keep[knee_index(bpw[keep], err[keep])])]["type"] if len(keep) else None
            if plan is not None:
                t["chosen"] = plan.type_for(t["name"])
        return {"db": self.rel(db), "tensors": sorted(per.values(), key=_tensor_order)}

    def load_plan(self, rel: str):
        from strategy.plan import PlanError, load_plan

        p = self.resolve(rel, "strategy file", must_exist=True)
        try:
            return load_plan(p)
        except PlanError as e:
            raise ApiError(400, str(e)) from None

    def plan(self, rel: str, model_rel: str | None) -> dict:
        plan = self.load_plan(rel)
        out: dict[str, Any] = {"path": self.rel(self.resolve(rel)), "plan": plan.to_dict()}
        if model_rel:
            rows = self.tensors(model_rel, None)["tensors"]
            out["rows"] = [{**r, "type": r["fixed_type"] or plan.type_for(r["name"]) if r["quantizable"]
                            else (r["fixed_type"] or "F32")} for r in rows]
        return out

    def save_plan(self, body: dict) -> dict:
        from strategy.plan import Plan, PlanError, save_plan, validate_plan

        path = self.resolve(body.get("path"), "strategy file")
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise ApiError(400, f"{self.rel(path)}: strategy files end in .yaml, .yml or .json")
        if not isinstance(body.get("plan"), dict):
            raise ApiError(400, "missing plan (a strategy mapping)")
        try:
            plan = Plan.from_dict(body["plan"], source=self.rel(path))
            names = None
            if body.get("model"):
                names = [r["name"] for r in self.tensors(body["model"], None)["tensors"]]
            validate_plan(plan, names if names is not None else list(plan.tensors), source=self.rel(path))
        except PlanError as e:
            raise ApiError(400, str(e)) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        save_plan(plan, path)
        return {"path": self.rel(path), "digest": plan.digest(), "tensors": len(plan.tensors)}

    def tensor_type_file(self, rel: str, model_rel: str | None, out_rel: str | None) -> dict:
        from strategy.plan import tensor_type_file_lines

        plan = self.load_plan(rel)
        if model_rel:
            names = [r["name"] for r in self.tensors(model_rel, None)["tensors"] if r["quantizable"]]
        else:
            names = list(plan.tensors)
        text = "\n".join(tensor_type_file_lines(plan, names)) + "\n"
        res: dict[str, Any] = {"text": text, "lines": len(names)}
        if out_rel:
            out = self.resolve(out_rel, "output file")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out)
            res["path"] = self.rel(out)
        return res

    def verify_report(self, rel: str) -> dict:
        p = self.resolve(rel, "verify report", must_exist=True)
        if p.is_dir():
            p = p / "results.json"
        if not p.exists():
            raise ApiError(404, f"{self.rel(p)} not found: run verification first")
        try:
            return {"path": self.rel(p), "report": json.loads(p.read_text(encoding="utf-8"))}
        except json.JSONDecodeError as e:
            raise ApiError(400, f"{self.rel(p)}:{e.lineno}: not valid JSON ({e.msg})") from None

    def submit(self, body: dict) -> dict:
        kind = body.get("kind")
        if kind not in KINDS:
            raise ApiError(400, f"unknown job kind {kind!r}; choose from {', '.join(sorted(KINDS))}")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "params must be an object")
        for k in PATH_PARAMS:  # every path a job will touch must be inside the workspace
            v = params.get(k)
            if v is None or v == "" or v == []:
                continue
            params[k] = [self.rel(self.resolve(i, k)) for i in v] if isinstance(v, list) \
                else self.rel(self.resolve(v, k))
        try:
            KINDS[kind].build(params, self.workspace)
        except ParamError as e:
            raise ApiError(400, str(e)) from None
        token = body.get("token") if isinstance(body.get("token"), str) else None
        job_id = self.store.submit(kind, params, secret=(token or "").strip() or None)
        self.ensure_worker()
        return self.store.get(job_id).to_dict()

    def job(self, job_id: int, log_lines: int = 200) -> dict:
        try:
            j = self.store.get(job_id).to_dict()
        except JobError as e:
            raise ApiError(404, str(e)) from None
        try:
            lines = self.store.log_path(job_id).read_text(encoding="utf-8", errors="replace").splitlines()
            j["log"] = lines[-log_lines:]
        except OSError:
            j["log"] = j["log_tail"]
        return j


def _tensor_order(t: dict) -> tuple:
    return (t["layer"] is not None, t["layer"] if t["layer"] is not None else -1, t["name"])


class Handler(BaseHTTPRequestHandler):
    app: App
    server_version = "gguf-strategy-ui"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("WEBUI_LOG"):
            super().log_message(format, *args)

    # ------------------------------------------------------------------ io
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if n > MAX_BODY:
            raise ApiError(413, f"request body too large ({n} bytes)")
        raw = self.rfile.read(n) if n > 0 else b""
        if not raw:
            return {}
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "request body must be a JSON object")
        return obj

    def _dispatch(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            path = unquote(url.path)
            if "\0" in path:
                raise ApiError(400, "invalid path")
            if path.startswith("/api/"):
                self._json(200, self._api(method, path[len("/api"):], q))
            elif method in ("GET", "HEAD"):
                self._static(path)
            else:
                raise ApiError(405, f"{method} not allowed on {path}")
        except ApiError as e:
            self._json_safe(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as e:  # a full disk or an unwritable path: the CLIs' one line, 507 when it is space
            self._json_safe(507 if is_disk_full(e) else 500, {"error": os_error_line(e)})
        except Exception as e:  # noqa: BLE001 - never let a request take the server down
            traceback.print_exc()
            self._json_safe(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _json_safe(self, status: int, obj: Any) -> None:
        try:
            self._json(status, obj)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ routes
    def _static(self, path: str) -> None:
        app = self.app
        if path in ("/", "/index.html"):
            f = STATIC / "index.html"
        elif path.startswith("/static/"):
            f = (STATIC / path[len("/static/"):]).resolve()
            if STATIC not in f.parents:
                raise ApiError(403, "outside the static folder")
        elif path.startswith("/files/"):
            f = app.resolve(path[len("/files/"):], "file", must_exist=True)
            if f.is_dir():
                raise ApiError(400, "that is a folder; use /api/files?dir=... to list it")
        elif path == "/favicon.ico":
            raise ApiError(404, "no favicon")
        else:
            raise ApiError(404, f"not found: {path}")
        if not f.is_file():
            raise ApiError(404, f"not found: {path}")
        ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        if f.suffix in (".yaml", ".yml", ".txt", ".log"):
            ctype = "text/plain; charset=utf-8"
        extra = {}
        if path.startswith("/files/"):
            extra["Content-Disposition"] = f'inline; filename="{f.name}"'
        self._send(200, f.read_bytes(), ctype, extra)

    def _api(self, method: str, path: str, q: dict[str, str]) -> Any:
        app = self.app
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts == ["info"]:
            return app.info()
        if method == "GET" and parts == ["files"]:
            exts = [e.strip().lower() for e in q.get("ext", "").split(",") if e.strip()]
            return app.list_files(q.get("dir", "."), exts or None)
        if method == "GET" and parts == ["models"]:
            return {"models": app.models()}
        if method == "POST" and parts == ["models", "open"]:
            return app.open_model(self._body().get("path"))
        if method == "GET" and parts == ["tensors"]:
            return app.tensors(q.get("model", ""), q.get("imatrix") or None)
        if method == "GET" and parts == ["measurements"]:
            return app.measurements(q.get("db", ""), q.get("plan") or None)
        if method == "GET" and parts == ["plan"]:
            return app.plan(q.get("path", ""), q.get("model") or None)
        if method == "POST" and parts == ["plan", "save"]:
            return app.save_plan(self._body())
        if method in ("GET", "POST") and parts == ["plan", "tensor-type-file"]:
            b = self._body() if method == "POST" else q
            return app.tensor_type_file(b.get("path", ""), b.get("model") or None, b.get("out") or None)
        if method == "GET" and parts == ["verify"]:
            return app.verify_report(q.get("path", ""))
        if method == "GET" and parts == ["jobs"]:
            return {"jobs": [j.to_dict() for j in app.store.list(state=q.get("state") or None,
                                                                    kind=q.get("kind") or None)],
                    "worker": worker_alive(app.store)}
        if method == "POST" and parts == ["jobs"]:
            return app.submit(self._body())
        if len(parts) >= 2 and parts[0] == "jobs":
            try:
                job_id = int(parts[1])
            except ValueError:
                raise ApiError(400, f"job id must be a number, got {parts[1]!r}") from None
            if method == "GET" and len(parts) == 2:
                return app.job(job_id)
            if method == "POST" and parts[2:] == ["cancel"]:
                try:
                    return app.store.request_cancel(job_id).to_dict()
                except JobError as e:
                    raise ApiError(404 if "no job" in str(e) else 409, str(e)) from None
        raise ApiError(404, f"no API route {method} /api{path}")


def make_server(app: App, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    return srv


def serve(workspace: str | Path, host: str = "127.0.0.1", port: int = 8765, start_worker: bool = True) -> None:
    app = App(workspace, start_worker=start_worker)
    srv = make_server(app, host, port)
    print(f"serving http://{host}:{srv.server_address[1]}/  (workspace {app.workspace})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this port can start jobs and read the "
              "workspace", file=sys.stderr, flush=True)
    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        app.close()
