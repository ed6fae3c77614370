"""A real HTTP server on 127.0.0.1 that answers the Hugging Face Hub endpoints huggingface_hub 2.x calls for a
download, so the downloader is tested end to end without the network (HF_ENDPOINT=http://127.0.0.1:PORT).

Endpoints: GET /api/models/{repo}[/revision/{rev}] (repo info), GET /api/models/{repo}/tree/{rev} (file list with
sizes, blob ids and LFS sha256), HEAD/GET /{repo}/resolve/{rev}/{path} (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size, Content-Length, Accept-Ranges, 206 for `Range: bytes=N-`). Auth behaves like the Hub: an unknown
token is 401 "Invalid credentials in Authorization header"; a missing or private repo is 401/404 RepoNotFound; a
gated repo lists fine but its files answer 401/403 GatedRepo unless the token accepted its terms.
`throttle` (seconds per 16 KiB chunk) makes downloads slow enough to interrupt in tests.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 16 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".onnx", ".model", ".gguf", ".msgpack", ".h5")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    private: bool = False
    sha: str = ""

    def __post_init__(self) -> None:
        if not self.sha:
            h = hashlib.sha1()
            for k in sorted(self.files):
                h.update(k.encode() + hashlib.sha256(self.files[k]).digest())
            self.sha = h.hexdigest()

    @staticmethod
    def from_dir(path: Path, **kw) -> FakeRepo:
        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        return FakeRepo(files=files, **kw)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    status: int


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    tokens: dict[str, set[str]] = field(default_factory=dict)  # token -> repos it may read (gated/private)
    throttle: float = 0.0
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.hub.requests.append(Request(self.command, self.path, self.headers.get("Range"),
                                         bool(self.headers.get("Authorization")), status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _token(self) -> tuple[str | None, bool]:
        """(token, valid)."""
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return None, True
        tok = auth[len("Bearer "):].strip()
        return tok, tok in self.hub.tokens

    def _repo(self, repo_id: str, for_files: bool) -> FakeRepo | None:
        """The repo if this request may see it; otherwise sends the Hub's error and returns None."""
        tok, valid = self._token()
        if not valid:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.hub.repos.get(repo_id)
        allowed = tok is not None and repo_id in self.hub.tokens.get(tok, set())
        if repo is None or (repo.private and not allowed):
            self._error(401 if tok is None else 404, "RepoNotFound", "Repository not found")
            return None
        if for_files and repo.gated and not allowed:
            if tok is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                            f"authorized list. Visit {self.hub.url}/{repo_id} to ask for access.")
            return None
        return repo

    def _revision_ok(self, repo: FakeRepo, rev: str) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return False

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            return self._tree(m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3))
        self._error(404, None, f"no route for {path}")

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, for_files=False)
        if repo is None or not self._revision_ok(repo, rev):
            return
        body = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
        self._send(200, json.dumps(body).encode())

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, for_files=False)
        if repo is None or not self._revision_ok(repo, rev):
            return
        out = []
        for f, data in sorted(repo.files.items()):
            entry = {"type": "file", "oid": _blob_oid(data), "size": len(data), "path": f}
            if f.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        self._send(200, json.dumps(out).encode())

    def _resolve(self, repo_id: str, rev: str, fname: str) -> None:
        repo = self._repo(repo_id, for_files=True)
        if repo is None or not self._revision_ok(repo, rev):
            return
        data = repo.files.get(fname)
        if data is None:
            self._error(404, "EntryNotFound", f"{fname} does not exist on revision {rev}")
            return
        lfs = fname.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else _blob_oid(data)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng:
            mr = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not mr or int(mr.group(1)) >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            start, status = int(mr.group(1)), 206
            end = int(mr.group(2)) if mr.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
            start = 0
        self.hub.requests.append(Request(self.command, self.path, rng, bool(self.headers.get("Authorization")),
                                         status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for i in range(0, len(data), CHUNK):
                self.wfile.write(data[i:i + CHUNK])
                if self.hub.throttle:
                    self.wfile.flush()
                    time.sleep(self.hub.throttle)
        except (BrokenPipeError, ConnectionResetError):
            pass


def main() -> None:
    """`python tests/fake_hub.py MODEL_DIR REPO_ID [--port N] [--throttle S] [--gated] [--token T]`:
    serve a local folder as a hub repo (for manual runs of the downloader and the web UI)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("repo_id")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--throttle", type=float, default=0.0)
    ap.add_argument("--gated", action="store_true")
    ap.add_argument("--token", action="append", default=[])
    a = ap.parse_args()
    hub = FakeHub(repos={a.repo_id: FakeRepo.from_dir(a.model_dir, gated=a.gated)},
                  tokens={t: {a.repo_id} for t in a.token}, throttle=a.throttle)

    class Handler(_Handler):
        pass

    Handler.hub = hub
    hub._server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    hub._server.serve_forever()


if __name__ == "__main__":
    main()
