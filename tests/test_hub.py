"""hub: downloads from a real local HTTP server standing in for the Hugging Face Hub (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo

from hub.download import META_DIR, select_files

ROOT = Path(__file__).resolve().parent.parent
GOOD = "hf_goodTokenForTests0123456789"
OTHER = "hf_otherAccountToken0123456789"


@pytest.fixture()
def hub(tiny_model, tmp_path, monkeypatch):
    src = tiny_model("llama")
    plain = FakeRepo.from_dir(src)
    plain.files["pytorch_model.bin"] = b"\0" * 5000               # duplicate weights: must be skipped
    plain.files["original/consolidated.00.pth"] = b"\1" * 300     # subfolder: must be skipped
    plain.files["onnx/model.onnx"] = b"\2" * 300
    plain.files["README.md"] = b"# tiny\n"
    bin_only = FakeRepo(files={"config.json": plain.files["config.json"], "pytorch_model.bin": b"\3" * 4000,
                               "tokenizer.model": plain.files["tokenizer.model"]})
    h = FakeHub(repos={"org/tiny": plain, "org/gated": FakeRepo.from_dir(src, gated=True),
                       "org/private": FakeRepo.from_dir(src, private=True), "org/binonly": bin_only},
                tokens={GOOD: {"org/gated", "org/private"}, OTHER: set()})
    h.start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login cache from the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    h.src = src  # type: ignore[attr-defined]
    yield h
    h.stop()


def run_cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "hub", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_select_files_prefers_safetensors_and_skips_duplicates():
    paths = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md", ".gitattributes",
             "original/consolidated.00.pth", "onnx/model.onnx", "flax_model.msgpack", "generation_config.json"]
    assert select_files(paths) == sorted(["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                          "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    # no safetensors: the PyTorch shards and their index are what conversion reads
    assert select_files(["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5"]) == \
        ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]


def test_download_gets_only_needed_files_with_progress(hub, tmp_path):
    out = tmp_path / "m"
    r = run_cli("download", "org/tiny", "--local-dir", str(out))
    assert r.returncode == 0, r.stderr
    got = sorted(p.name for p in out.iterdir() if p.name != META_DIR)
    assert got == sorted(p.name for p in hub.src.iterdir())  # exactly the tiny model's files
    for p in hub.src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    fracs = [float(ln.split()[1]) for ln in r.stdout.splitlines() if ln.startswith("PROGRESS")]
    assert fracs and fracs[-1] == 1.0 and fracs == sorted(fracs)
    # a second run downloads nothing (only the repo listing and tree are fetched again)
    n = len(hub.requests)
    r2 = run_cli("download", "org/tiny", "--local-dir", str(out))
    assert r2.returncode == 0, r2.stderr
    assert not [q for q in hub.requests[n:] if "/resolve/" in q.path]


def test_download_falls_back_to_bin_when_no_safetensors(hub, tmp_path):
    r = run_cli("download", "org/binonly", "--local-dir", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "pytorch_model.bin").stat().st_size == 4000


def test_resume_continues_a_partial_file_with_range(hub, tmp_path):
    out = tmp_path / "m"
    data = (hub.src / "model.safetensors").read_bytes()
    cut = len(data) // 3
    meta = out / META_DIR
    meta.mkdir(parents=True)
    (meta / "model.safetensors.part").write_bytes(data[:cut])
    # the stamp ties the partial bytes to the remote blob; take the blob id from the real tree listing
    tree = json.loads(_get(hub.url + "/api/models/org/tiny/tree/main"))
    blob = next(e["oid"] for e in tree if e["path"] == "model.safetensors")
    (meta / "model.safetensors.part.json").write_text(json.dumps({"blob_id": blob}))
    r = run_cli("download", "org/tiny", "--local-dir", str(out))
    assert r.returncode == 0, r.stderr
    ranges = [q.range for q in hub.requests if q.path.endswith("/model.safetensors") and q.method == "GET"]
    assert ranges == [f"bytes={cut}-"]
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not (meta / "model.safetensors.part").exists()


def test_corrupt_partial_is_caught_by_sha256_then_redownloaded(hub, tmp_path):
    out = tmp_path / "m"
    data = (hub.src / "model.safetensors").read_bytes()
    meta = out / META_DIR
    meta.mkdir(parents=True)
    (meta / "model.safetensors.part").write_bytes(b"\xff" * 1000)  # wrong bytes, right blob stamp
    tree = json.loads(_get(hub.url + "/api/models/org/tiny/tree/main"))
    blob = next(e["oid"] for e in tree if e["path"] == "model.safetensors")
    (meta / "model.safetensors.part.json").write_text(json.dumps({"blob_id": blob}))
    r = run_cli("download", "org/tiny", "--local-dir", str(out))
    assert r.returncode == 2
    assert "sha256 does not match" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("download", "org/tiny", "--local-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("repo,token,expect", [
    ("org/gated", None, "is a gated repo: accept its terms at"),
    ("org/gated", OTHER, "has not been granted access"),
    ("org/gated", "hf_thisTokenDoesNotExist000000", "token was rejected"),
    ("org/missing", None, "repo 'org/missing' not found"),
    ("org/private", None, "if it is private, pass a token"),
    ("org/private", OTHER, "check that your token belongs to an account with access"),
])
def test_auth_errors_say_what_to_do(hub, tmp_path, repo, token, expect):
    r = run_cli("download", repo, "--local-dir", str(tmp_path / "x"), token=token)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    if token:
        assert token not in r.stderr + r.stdout


def test_gated_repo_with_accepted_terms_downloads(hub, tmp_path):
    r = run_cli("download", "org/gated", "--local-dir", str(tmp_path / "g"), token=GOOD)
    assert r.returncode == 0, r.stderr
    assert GOOD not in r.stdout + r.stderr
    assert all(q.authorized for q in hub.requests if "/resolve/" in q.path)
    assert (tmp_path / "g" / "model.safetensors").read_bytes() == (hub.src / "model.safetensors").read_bytes()


def test_bad_revision_and_bad_repo_id(hub, tmp_path):
    r = run_cli("download", "org/tiny", "--revision", "v9", "--local-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "revision 'v9' does not exist" in r.stderr
    r = run_cli("download", "not-a-repo-id", "--local-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "is not a repo id" in r.stderr


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    r = run_cli("download", "org/tiny", "--local-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "cannot reach" in r.stderr and "Traceback" not in r.stderr


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as f:  # noqa: S310 - loopback test server
        return f.read()
