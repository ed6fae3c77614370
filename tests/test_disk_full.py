"""A full disk, for real: every stage's CLI says so in one line naming the output and the fix, and leaves nothing
half-written (no partial file, no temp file) at the destination.

The disk is an 8 MiB tmpfs filled to a few KiB, so these tests need permission to mount (root, as in CI);
elsewhere they skip. `outputs.py`'s helpers are also tested without a mount.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo
from full_disk import full_disk_at

from outputs import is_disk_full, os_error_line, write_atomic

ROOT = Path(__file__).resolve().parent.parent
NO_SPACE = "no space left on device"


# --- outputs.py without a mount ------------------------------------------------------------------------------

def test_write_atomic_replaces_whole_and_keeps_mode(tmp_path):
    out = tmp_path / "plan.yaml"
    out.write_text("old\n")
    write_atomic(out, "new\n")
    assert out.read_text() == "new\n"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_write_atomic_failure_names_the_destination_and_leaves_no_temp(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()  # rename onto a directory fails after the data was written
    (out / "x").write_text("keep")
    with pytest.raises(OSError) as ei:
        write_atomic(out, b"data")
    assert ei.value.filename == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (out / "x").read_text() == "keep"


def test_os_error_line_says_what_to_do():
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device", "/x/plan.yaml")) == (
        f"/x/plan.yaml: {NO_SPACE}; free some space or choose an output path on another disk")
    assert os_error_line(OSError(errno.EACCES, "Permission denied", "/x/p")) == (
        "/x/p: permission denied; choose a writable output path")
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")).startswith(NO_SPACE)
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(sqlite3.OperationalError("no such table: results"))
    assert os_error_line(OSError(errno.ENOENT, "No such file or directory", "/x/m")) == "/x/m: No such file or directory"


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


# --- a real full disk ----------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path_factory) -> Iterator[Path]:
    """An 8 MiB tmpfs (room for sqlite's write-ahead log once freed) filled to a few KiB by `filler`."""
    with full_disk_at(tmp_path_factory.mktemp("full-disk") / "mnt") as d:
        yield d


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _one_line_no_space(res: subprocess.CompletedProcess, names: Path) -> None:
    assert res.returncode != 0
    err = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(err) == 1 and NO_SPACE in err[0] and str(names) in err[0], res.stderr[-2000:]


def _left(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.iterdir() if p.name != "filler")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_model, calibration_text) -> tuple[Path, Path, Path]:
    """(model, imatrix, measurement db) of the tiny llama, made with room to spare."""
    model = tiny_model("llama")
    d = tmp_path_factory.mktemp("measured")
    im, db = d / "imatrix.gguf", d / "m.sqlite"
    res = _run("-m", "measure", "imatrix", str(model), "--text", str(calibration_text), "--ctx", "128", "--chunks",
               "4", "-o", str(im))
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run("-m", "measure", str(model), "--imatrix", str(im), "--db", str(db), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    return model, im, db


@pytest.mark.slow
def test_measure_db_on_a_full_disk_resumes_once_space_is_freed(full_disk, measured):
    model, im, _ = measured
    db = full_disk / "m.sqlite"
    res = _run("-m", "measure", str(model), "--imatrix", str(im), "--db", str(db), "--no-progress")
    _one_line_no_space(res, db)
    (full_disk / "filler").unlink()
    res = _run("-m", "measure", str(model), "--imatrix", str(im), "--db", str(db), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_small_outputs_on_a_full_disk(full_disk, measured, tmp_path):
    """Plans, tensor-type files, exports and imatrix files: one line, and nothing left behind."""
    model, im, db = measured
    cases = [
        (full_disk / "plan.yaml", ["-m", "strategy", "build", "--db", str(db), "--model", str(model), "--imatrix",
                                   str(im), "--target-bpw", "4.5", "-o", str(full_disk / "plan.yaml")]),
        (full_disk / "m.csv", ["-m", "measure", "export", "--db", str(db), "-o", str(full_disk / "m.csv")]),
        (full_disk / "im.gguf", ["-m", "measure", "imatrix", str(model), "--text",
                                 str(ROOT / "tests/data/calibration.txt"), "--ctx", "128", "--chunks", "2", "-o",
                                 str(full_disk / "im.gguf")]),
    ]
    plan = tmp_path / "plan.yaml"  # a plan to export, made where there is room
    res = _run("-m", "strategy", "build", "--db", str(db), "--model", str(model), "--imatrix", str(im),
               "--target-bpw", "4.5", "-o", str(plan))
    assert res.returncode == 0, res.stderr[-2000:]
    st = os.statvfs(full_disk)
    (full_disk / "filler2").write_bytes(b"\0" * (st.f_bavail * st.f_frsize))
    cases.append((full_disk / "tt.txt", ["-m", "strategy", "export", str(plan), "--tensor-type-file",
                                         str(full_disk / "tt.txt")]))
    for out, args in cases:
        res = _run(*args)
        _one_line_no_space(res, out)
        assert _left(full_disk) == ["filler2"], (args, _left(full_disk))


@pytest.mark.slow
def test_convert_and_smooth_on_a_full_disk(full_disk, measured, tmp_path):
    model, im, _ = measured
    out = full_disk / "model.gguf"
    res = _run("convert_hf_to_gguf_strategy.py", str(model), "--outtype", "q8_0", "--outfile", str(out))
    _one_line_no_space(res, out)
    assert _left(full_disk) == []
    out = full_disk / "smoothed"
    res = _run("-m", "measure", "smooth", str(model), "--imatrix", str(im), "-o", str(out), "--imatrix-out",
               str(full_disk / "smoothed.gguf"))
    _one_line_no_space(res, out)
    assert _left(full_disk) == []
    # the checkpoint has room, its imatrix does not: the error names the imatrix, and no checkpoint is left
    im_out = full_disk / "smoothed.gguf"
    res = _run("-m", "measure", "smooth", str(model), "--imatrix", str(im), "-o", str(tmp_path / "smoothed"),
               "--imatrix-out", str(im_out))
    _one_line_no_space(res, im_out)
    assert _left(full_disk) == [] and not (tmp_path / "smoothed").exists()


@pytest.mark.slow
def test_download_on_a_full_disk_is_not_a_network_error(full_disk, tiny_model):
    hub = FakeHub(repos={"org/tiny": FakeRepo.from_dir(tiny_model("llama"))}).start()
    try:
        res = _run("-m", "hub", "download", "org/tiny", "--local-dir", str(full_disk / "m"),
                   env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"})
    finally:
        hub.stop()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert NO_SPACE in res.stderr and "rerun" in res.stderr and "cannot reach" not in res.stderr, res.stderr


@pytest.mark.slow
def test_verify_report_on_a_full_disk_is_all_or_nothing(full_disk, measured, tmp_path):
    model, _, _ = measured
    base, cand = tmp_path / "base-f32.gguf", tmp_path / "cand-q8_0.gguf"
    for out, outtype in ((base, "f32"), (cand, "q8_0")):
        res = _run("convert_hf_to_gguf_strategy.py", str(model), "--outtype", outtype, "--outfile", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
    rep = full_disk / "report"
    res = _run("-m", "verify", "--base", str(base), "--text", str(ROOT / "tests/data/evaluation.txt"), "--ctx",
               "128", "--chunks", "2", "--cache-dir", str(tmp_path / "cache"), "-o", str(rep), str(cand))
    _one_line_no_space(res, rep)
    assert not rep.exists() or list(rep.iterdir()) == []  # no table.txt without its results.csv
