"""jobs: the sqlite store and the worker, with real processes (kill -9 mid-download, restart, finish)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo

from jobs.kinds import parse_progress
from jobs.store import LOG_TAIL_LINES, JobError, JobStore

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_secretJobsToken0123456789abcd"


# ------------------------------------------------------------------------------------------- store
def test_store_lifecycle_and_wal(tmp_path):
    s = JobStore(tmp_path / "j.sqlite")
    with sqlite3.connect(tmp_path / "j.sqlite") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a = s.submit("download", {"repo_id": "o/a"})
    b = s.submit("download", {"repo_id": "o/b"})
    assert [j.id for j in s.list()] == [b, a]
    job = s.claim_next(worker_pid=123)
    assert job is not None and job.id == a and job.state == "running" and job.attempts == 1
    assert s.update(a, progress=0.5, message="half", log_lines=[f"line {i}" for i in range(200)]) is False
    j = s.get(a)
    assert j.progress == 0.5 and j.message == "half" and len(j.log_tail) == LOG_TAIL_LINES
    assert j.log_tail[-1] == "line 199"
    s.finish(a, "done", result={"model": "models/a"})
    j = s.get(a)
    assert j.state == "done" and j.progress == 1.0 and j.result == {"model": "models/a"} and j.finished
    with pytest.raises(JobError, match="already done"):
        s.request_cancel(a)
    with pytest.raises(JobError, match="no job with id 999"):
        s.get(999)
    assert s.request_cancel(b).state == "cancelled"  # queued: cancelled at once
    assert s.claim_next(worker_pid=123) is None


def test_cancel_running_sets_flag_and_orphans_requeue(tmp_path):
    s = JobStore(tmp_path / "j.sqlite")
    a = s.submit("measure", {"model": "m"})
    b = s.submit("measure", {"model": "m"})
    s.claim_next(worker_pid=11)
    s.claim_next(worker_pid=11)
    assert s.request_cancel(b).state == "running"
    assert s.update(b) is True  # the worker learns about the cancel on its next update
    assert s.requeue_orphans(live_worker_pid=22) == [a]  # b was being cancelled: it ends cancelled instead
    assert s.get(a).state == "queued" and "re-queued" in s.get(a).log_tail[-1]
    assert s.get(b).state == "cancelled"
    for _ in range(4):  # a job whose worker keeps dying is failed, not retried forever
        s.claim_next(worker_pid=11)
        s.requeue_orphans(live_worker_pid=22)
    s.claim_next(worker_pid=11)
    s.requeue_orphans(live_worker_pid=22)
    assert s.get(a).state == "failed" and "interrupted 5 times" in s.get(a).error


def _claimer(db: str, out: multiprocessing.Queue) -> None:
    s = JobStore(db)
    got = []
    while (j := s.claim_next(os.getpid())) is not None:
        got.append(j.id)
    out.put(got)


def test_concurrent_claims_never_double_claim(tmp_path):
    db = str(tmp_path / "j.sqlite")
    s = JobStore(db)
    ids = [s.submit("download", {"repo_id": f"o/{i}"}) for i in range(60)]
    q: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_claimer, args=(db, q)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [i for _ in procs for i in q.get(timeout=60)]
    for p in procs:
        p.join()
    assert sorted(claimed) == ids


def test_secret_is_kept_out_of_the_database(tmp_path):
    s = JobStore(tmp_path / "j.sqlite")
    j = s.submit("download", {"repo_id": "o/a"}, secret=TOKEN)
    assert s.read_secret(j) == TOKEN
    assert oct((s.secrets_dir / str(j)).stat().st_mode & 0o777) == "0o600"
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("j.sqlite*"))
    assert TOKEN.encode() not in blob
    s.claim_next(1)
    s.finish(j, "failed", error="x")
    assert s.read_secret(j) is None


@pytest.mark.parametrize("line,frac", [
    ("PROGRESS 0.25 1.0/4.0 MB model.safetensors", 0.25),
    ("[3/12] blk.0.attn_q.weight", 0.25),
    ("measuring 30 / 120 tensors", 0.25),
    ("[measure] tensors 3/12  results 40/168", 0.25),  # python -m measure's \r status line
    (" 42%|████      | 42/100", 0.42),
    ("loading config", None),
    ("shape (256, 512)", None),
])
def test_parse_progress(line, frac):
    got, _ = parse_progress(line)
    assert (got is None and frac is None) or got == pytest.approx(frac)


# ------------------------------------------------------------------------------------------- worker
@pytest.fixture()
def hub(tiny_model, tmp_path, monkeypatch):
    src = tiny_model("llama")
    h = FakeHub(repos={"org/tiny": FakeRepo.from_dir(src), "org/gated": FakeRepo.from_dir(src, gated=True)},
                tokens={TOKEN: {"org/gated"}})
    h.start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    h.src = src  # type: ignore[attr-defined]
    yield h
    h.stop()


def start_worker(ws: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs", "--workspace", str(ws), "worker", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def jobs_cli(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs", "--workspace", str(ws), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_worker_runs_jobs_and_reports_errors(hub, tmp_path):
    ws = tmp_path / "ws"
    store = JobStore(ws / "jobs" / "jobs.sqlite")
    ok = store.submit("download", {"repo_id": "org/tiny"})
    missing = store.submit("download", {"repo_id": "org/nope"})
    gated = store.submit("download", {"repo_id": "org/gated", "local_dir": "models/g"}, secret=TOKEN)
    bad = store.submit("download", {})
    r = subprocess.run([sys.executable, "-m", "jobs", "--workspace", str(ws), "worker", "--once"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    j = store.get(ok)
    assert j.state == "done" and j.progress == 1.0 and j.result == {"model": "models/org__tiny"}
    assert (ws / "models/org__tiny/model.safetensors").read_bytes() == (hub.src / "model.safetensors").read_bytes()
    j = store.get(missing)
    assert j.state == "failed" and j.error.startswith("error: repo 'org/nope' not found")
    j = store.get(gated)
    assert j.state == "done", j.error
    assert store.read_secret(gated) is None  # the token file is gone once the job ended
    j = store.get(bad)
    assert j.state == "failed" and "missing parameter 'repo_id'" in j.error
    everything = b"".join(p.read_bytes() for p in (ws / "jobs").rglob("*") if p.is_file())
    assert TOKEN.encode() not in everything  # not in the db, its WAL, or any log
    listing = jobs_cli(ws, "list").stdout
    assert f"{ok:>5}  download  done" in listing and "not found" in listing
    shown = jobs_cli(ws, "show", str(missing))
    assert "error:" in shown.stdout and shown.returncode == 0
    assert jobs_cli(ws, "show", "4242").returncode == 2
    assert "already done" in jobs_cli(ws, "cancel", str(ok)).stderr


def test_only_one_worker_per_database(tmp_path):
    ws = tmp_path / "ws"
    w1 = start_worker(ws)
    try:
        wait_for(lambda: (ws / "jobs" / "jobs.sqlite.worker.lock").exists() and
                 (ws / "jobs" / "jobs.sqlite.worker.lock").read_text().strip() == str(w1.pid), what="worker lock")
        r = jobs_cli(ws, "worker")
        assert r.returncode == 2 and "already running for" in r.stderr and str(w1.pid) in r.stderr
    finally:
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(timeout=20) == 0


def test_cancel_stops_the_running_process(hub, tmp_path):
    hub.throttle = 0.05  # ~10 s for the weights
    ws = tmp_path / "ws"
    store = JobStore(ws / "jobs" / "jobs.sqlite")
    jid = store.submit("download", {"repo_id": "org/tiny"})
    w = start_worker(ws)
    try:
        wait_for(lambda: store.get(jid).progress > 0.05, what="download progress")
        j = store.get(jid)
        child = j.child_pid
        assert child and _alive(child), j
        assert "cancel requested" in jobs_cli(ws, "cancel", str(jid)).stdout
        wait_for(lambda: store.get(jid).state == "cancelled", 30, "cancelled state")
        wait_for(lambda: not _alive(child), 10, "child exit")
        assert not (ws / "models/org__tiny/model.safetensors").exists()
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(timeout=20)


def test_kill_9_worker_mid_download_then_restart_resumes(hub, tmp_path):
    hub.throttle = 0.03  # 2.9 MB in 16 KiB chunks: ~5 s
    ws = tmp_path / "ws"
    store = JobStore(ws / "jobs" / "jobs.sqlite")
    jid = store.submit("download", {"repo_id": "org/tiny"})
    w = start_worker(ws)
    wait_for(lambda: store.get(jid).progress > 0.3, what="download progress")
    child = store.get(jid).child_pid
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=10)
    wait_for(lambda: not _alive(child), 10, "the download child to die with its worker")
    j = store.get(jid)
    assert j.state == "running"  # nobody updated it: the worker died
    part = ws / "models/org__tiny/.download/model.safetensors.part"
    have = part.stat().st_size
    assert have > 0
    hub.throttle = 0.0
    w2 = start_worker(ws)
    try:
        wait_for(lambda: store.get(jid).state in ("done", "failed"), 60, "job end after restart")
    finally:
        w2.send_signal(signal.SIGTERM)
        w2.wait(timeout=20)
    j = store.get(jid)
    assert j.state == "done", j.error
    assert j.attempts == 2 and any("re-queued" in ln for ln in j.log_tail)
    ranges = [q.range for q in hub.requests if q.path.endswith("/model.safetensors") and q.method == "GET"]
    assert ranges[0] is None and ranges[-1] is not None
    resumed_at = int(ranges[-1].split("=")[1].rstrip("-"))
    assert resumed_at >= have * 0.5  # continued from the partial file, not from byte 0
    got = (ws / "models/org__tiny/model.safetensors").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256((hub.src / "model.safetensors").read_bytes()).hexdigest()
    log = store.log_path(jid).read_text()
    assert "attempt 1" in log and "attempt 2" in log


def test_clean_worker_stop_requeues_running_job(hub, tmp_path):
    hub.throttle = 0.05
    ws = tmp_path / "ws"
    store = JobStore(ws / "jobs" / "jobs.sqlite")
    jid = store.submit("download", {"repo_id": "org/tiny"})
    w = start_worker(ws)
    wait_for(lambda: store.get(jid).progress > 0.05, what="download progress")
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=30) == 0
    j = store.get(jid)
    assert j.state == "queued" and j.message == "worker stopped; re-queued"
    assert json.loads(jobs_cli(ws, "show", str(jid), "--json").stdout)["state"] == "queued"


def test_kinds_pass_the_covariance_file_to_every_stage(tmp_path):
    """`hessian` in a job's params: written by the imatrix job, read by measure, strategy and convert."""
    from jobs.kinds import KINDS

    ws = tmp_path
    (ws / "models" / "m").mkdir(parents=True)
    cmd = KINDS["imatrix"].build({"model": "models/m", "hessian": "measurements/m.cov.safetensors"}, ws)
    i = cmd.argv.index("--hessian")
    assert Path(cmd.argv[i + 1]) == ws / "measurements" / "m.cov.safetensors"
    assert cmd.outputs["hessian"] == "measurements/m.cov.safetensors"
    params = {"model": "models/m", "db": "m.sqlite", "strategy": "s.yaml", "hessian": "measurements/m.cov.safetensors"}
    for kind in ("measure", "strategy", "convert"):
        argv = KINDS[kind].build(dict(params), ws).argv
        assert argv[argv.index("--hessian") + 1] == str(ws / "measurements" / "m.cov.safetensors"), kind
        assert "--hessian" not in KINDS[kind].build({k: v for k, v in params.items() if k != "hessian"}, ws).argv


def test_smooth_job_writes_the_checkpoint_later_jobs_read(tmp_path, tiny_model, calibration_text):
    """The smooth kind's command runs as is and names the smoothed model and imatrix it wrote."""
    import subprocess

    from jobs.kinds import KINDS
    from measure.imatrix_compute import compute_imatrix

    ws = tmp_path
    model = tiny_model("llama")
    compute_imatrix(model, calibration_text, ws / "measurements" / "m.imatrix.gguf", ctx=64, chunks=1, device="cpu")
    cmd = KINDS["smooth"].build({"model": str(model), "imatrix": "measurements/m.imatrix.gguf", "alpha": 0.5,
                                 "order_text": str(calibration_text)}, ws)
    assert cmd.argv[cmd.argv.index("--order-text") + 1] == str(calibration_text)
    assert cmd.outputs == {"model": f"models/{model.name}-smooth",
                           "imatrix": f"measurements/{model.name}-smooth.imatrix.gguf"}
    p = subprocess.run(cmd.argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((ws / cmd.outputs["model"] / "smoothing.json").read_text())["channel_order"] is not None
    assert (ws / cmd.outputs["imatrix"]).is_file()
    argv = KINDS["measure"].build({"model": cmd.outputs["model"], "imatrix": cmd.outputs["imatrix"]}, ws).argv
    assert str(ws / cmd.outputs["model"]) in argv
