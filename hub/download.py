"""Download the files a conversion needs from a Hugging Face repo, resumably, with progress.

Why not a bare `snapshot_download`: in huggingface_hub 2.x an interrupted file is written to a per-process temp
name and deleted on failure, so a killed download restarts every file from byte 0. We use the same library
(repo info and tree listing through `HfApi`, metadata through `get_hf_file_metadata`, bytes through `http_get`
with `resume_size`) but keep partial files under `<dir>/.download/` and continue them with HTTP Range requests,
check each LFS file's sha256, and only then rename it into place. Rerunning the same command resumes.

The token comes from the caller, else HF_TOKEN, else the `hf auth login` cache (huggingface_hub's lookup); it is
never printed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from outputs import is_disk_full

META_DIR = ".download"

# Small files the converter and tokenizer loaders read (top level of the repo only).
NEEDED_FILES = (
    "config.json", "generation_config.json", "params.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
NEEDED_GLOBS = ("*.tiktoken", "tokenizer*.json", "tokenizer*.model")


class HubError(RuntimeError):
    """A download problem the user can fix; the message says how."""


@dataclass
class RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # LFS files only


def select_files(paths: list[str]) -> list[str]:
    """The files conversion needs: config + tokenizer files + one weight format (safetensors when present).

    Only top-level files: subfolders hold other formats (original/*.pth, onnx/, gguf variants) we never read.
    """
    top = [p for p in paths if "/" not in p]
    wanted = {p for p in top if p in NEEDED_FILES or any(fnmatch.fnmatch(p, g) for g in NEEDED_GLOBS)}
    st = [p for p in top if p.endswith(".safetensors")]
    if st:
        wanted |= set(st) | {p for p in top if p.endswith(".safetensors.index.json")}
    else:
        wanted |= {p for p in top if fnmatch.fnmatch(p, "pytorch_model*.bin") or p.endswith(".bin.index.json")}
        wanted |= {p for p in top if fnmatch.fnmatch(p, "consolidated*.pth")}
    return sorted(wanted)


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _explain(e: Exception, repo_id: str, revision: str, token_given: bool) -> HubError:
    """Turn a huggingface_hub / HTTP exception into one line saying what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{_endpoint()}/{repo_id}"
    how_token = ("pass a token (UI token field, HF_TOKEN, or `hf auth login`)" if not token_given
                 else "check that your token belongs to an account with access")
    status = getattr(getattr(e, "response", None), "status_code", None)
    server_msg = ""
    resp = getattr(e, "response", None)
    if resp is not None:
        server_msg = resp.headers.get("X-Error-Message", "") or ""
    if isinstance(e, GatedRepoError):
        if not token_given:
            return HubError(f"{repo_id} is a gated repo: accept its terms at {page} while logged in, then pass a "
                            "token of that account (UI token field, HF_TOKEN, or `hf auth login`) and retry")
        return HubError(f"{repo_id} is a gated repo and your token's account has not been granted access: open "
                        f"{page}, accept the terms (or wait for approval), then retry")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision {revision!r} does not exist in {repo_id}: use a branch, tag or commit listed "
                        f"at {page}")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"repo {repo_id!r} not found at {_endpoint()}: check the id (owner/name); if it is private, "
                        f"{how_token}")
    if isinstance(e, RemoteEntryNotFoundError):
        return HubError(f"a file listed by {repo_id} is missing on the server ({e}); retry later")
    if isinstance(e, HfHubHTTPError) and status == 401:
        if "Invalid credentials" in server_msg or "invalid" in server_msg.lower():
            return HubError("the Hugging Face token was rejected (invalid or expired): create a read token at "
                            "https://huggingface.co/settings/tokens and retry with it")
        return HubError(f"{repo_id}: authentication required; {how_token}")
    if isinstance(e, HfHubHTTPError) and status == 403:
        return HubError(f"{repo_id}: your token is not allowed to read this repo ({server_msg or 'forbidden'}); "
                        "use a token with read access")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"{repo_id}: the hub answered HTTP {status} ({server_msg or e}); retry later — finished "
                        "files are kept and partial ones resume")
    if is_disk_full(e):  # before the network branch: a full disk is an OSError too
        return HubError(f"{repo_id}: no space left on device while downloading; free some space (or choose another "
                        "--local-dir) and rerun: finished files are kept and partial ones resume")
    if isinstance(e, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError, OSError)):
        return HubError(f"cannot reach {_endpoint()} ({type(e).__name__}: {e}); check the network (or HF_ENDPOINT) "
                        "and rerun: finished files are kept and partial ones resume")
    return HubError(f"{repo_id}: {type(e).__name__}: {e}")


def list_remote(repo_id: str, revision: str = "main", token: str | None = None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, every file in the repo at that commit)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=_endpoint(), token=token)
    try:
        info = api.model_info(repo_id, revision=revision)
        sha = info.sha or revision
        files = [RemoteFile(f.path, int(f.size or 0), f.blob_id, f.lfs.sha256 if f.lfs else None)
                 for f in api.list_repo_tree(repo_id, recursive=True, revision=sha) if isinstance(f, RepoFile)]
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        raise _explain(e, repo_id, revision, token_given=bool(token or _env_token())) from None
    return sha, files


def _env_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ProgressFn = Callable[[int, int, str], None]


def _print_progress(done: int, total: int, current: str) -> None:
    frac = done / total if total else 1.0
    print(f"PROGRESS {frac:.4f} {done / 1e6:.1f}/{total / 1e6:.1f} MB {current}", flush=True)


def download(repo_id: str, local_dir: str | Path, *, revision: str | None = None, token: str | None = None,
             progress: ProgressFn | None = _print_progress, interval: float = 0.5) -> Path:
    """Download (or resume) the needed files of `repo_id` into `local_dir`; returns local_dir."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    # http_get yields (and writes) one chunk at a time; its 10 MB default makes progress and resume coarse
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1 << 20)
    revision = revision or "main"
    token = token or None
    if not repo_id or repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise HubError(f"{repo_id!r} is not a repo id: use owner/name, e.g. HuggingFaceTB/SmolLM2-135M")
    local_dir = Path(local_dir)
    meta = local_dir / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    sha, remote = list_remote(repo_id, revision, token)
    by_path = {f.path: f for f in remote}
    chosen = [by_path[p] for p in select_files(list(by_path))]
    if not any(f.path == "config.json" for f in chosen):
        raise HubError(f"{repo_id} has no config.json at the top level: it is not a transformers checkpoint "
                       "this tool can convert")
    if not any(f.path.endswith((".safetensors", ".bin", ".pth")) for f in chosen):
        raise HubError(f"{repo_id} has no *.safetensors (or pytorch_model*.bin) weights at the top level")

    total = sum(f.size for f in chosen)
    state = {"done": 0, "current": ""}
    finished = threading.Event()

    def tick() -> None:
        while not finished.wait(interval):
            part = meta / (state["current"] + ".part") if state["current"] else None
            extra = part.stat().st_size if part is not None and part.exists() else 0
            if progress:
                progress(min(total, state["done"] + extra), total, state["current"])

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    token_given = bool(token or _env_token())
    try:
        for f in chosen:
            dest = local_dir / f.path
            stamp = meta / (f.path + ".json")
            want = {"commit": sha, "blob_id": f.blob_id, "sha256": f.sha256, "size": f.size}
            if dest.exists() and stamp.exists() and dest.stat().st_size == f.size:
                try:
                    have = json.loads(stamp.read_text())
                except (OSError, json.JSONDecodeError):
                    have = {}
                if have.get("blob_id") == f.blob_id:
                    state["done"] += f.size
                    continue
            part = meta / (f.path + ".part")
            part_stamp = meta / (f.path + ".part.json")
            part.parent.mkdir(parents=True, exist_ok=True)
            if part.exists():
                try:
                    same = json.loads(part_stamp.read_text()).get("blob_id") == f.blob_id
                except (OSError, json.JSONDecodeError):
                    same = False
                if not same or part.stat().st_size > f.size:
                    part.unlink()
            part_stamp.write_text(json.dumps(want))
            state["current"] = f.path
            url = hf_hub_url(repo_id, f.path, revision=sha, endpoint=_endpoint())
            try:
                md = get_hf_file_metadata(url, token=token)
                headers = build_hf_headers(token=token)
                src = md.location or url
                if urlsplit(src).netloc != urlsplit(url).netloc:
                    headers.pop("authorization", None)  # signed CDN url: never send the token off the hub
                have = part.stat().st_size if part.exists() else 0
                if have < f.size or f.size == 0:
                    with open(part, "r+b" if part.exists() else "wb") as out:
                        out.seek(have)  # not "ab": http_get seeks back when a server ignores Range
                        http_get(src, out, resume_size=have, headers=headers, expected_size=f.size,
                                 displayed_filename=f.path, tqdm_class=_SilentTqdm)
            except Exception as e:  # noqa: BLE001
                raise _explain(e, repo_id, revision, token_given) from None
            if part.stat().st_size != f.size:
                raise HubError(f"{f.path}: got {part.stat().st_size} bytes, expected {f.size}; rerun to resume")
            if f.sha256 and _sha256(part) != f.sha256:
                part.unlink()
                raise HubError(f"{f.path}: sha256 does not match the hub's; the partial file was discarded, rerun "
                               "to download it again")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, dest)
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(want))
            part_stamp.unlink(missing_ok=True)
            state["done"] += f.size
            state["current"] = ""
        (meta / "complete.json").write_text(json.dumps({"repo_id": repo_id, "revision": revision, "commit": sha,
                                                        "files": [f.path for f in chosen], "bytes": total,
                                                        "time": time.time()}, indent=1))
    except OSError as e:  # the bookkeeping files fill a disk too
        if is_disk_full(e):
            raise _explain(e, repo_id, revision, token_given) from None
        raise
    finally:
        finished.set()
        ticker.join()
    if progress:
        progress(total, total, "")
    return local_dir


class _SilentTqdm:
    """tqdm stand-in: our own ticker reports progress from the partial file size."""

    def __init__(self, *a: object, **k: object) -> None:
        pass

    def __enter__(self) -> _SilentTqdm:
        return self

    def __exit__(self, *a: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, *a: object, **k: object) -> None:
        pass

    def refresh(self) -> None:
        pass
