"""The worker: claims queued jobs and runs each stage's CLI as a child process, turning its output into progress.

One worker per job database (an flock on `<db>.worker.lock`, released by the kernel when the worker dies, tells
everyone whether one is alive). On start it re-queues jobs a dead worker left `running` — after making sure
their children are gone — so resumable stages continue from what they saved. Children get SIGTERM when the
worker dies (PR_SET_PDEATHSIG), so a kill -9 of the worker never leaves two processes writing one output.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from jobs.kinds import ROOT, ParamError, get_kind, parse_progress
from jobs.store import Job, JobStore

FLUSH_EVERY = 0.4  # seconds between progress/log writes to the db
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _kill_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.time() + wait
        while time.time() < end:
            if not _alive(pid):
                return
            time.sleep(0.05)


def lock_path(store: JobStore) -> Path:
    return store.path.with_name(store.path.name + ".worker.lock")


def worker_alive(store: JobStore) -> int | None:
    """pid of the live worker for this db, or None (probes the flock without keeping it)."""
    p = lock_path(store)
    if not p.exists():
        return None
    with open(p, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            txt = f.read().strip()
            return int(txt) if txt.isdigit() else -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _scrub(line: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            line = line.replace(s, "***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", line)


class Worker:
    def __init__(self, store: JobStore, workspace: str | Path, concurrency: int = 1, poll: float = 0.3):
        self.store = store
        self.workspace = Path(workspace).resolve()
        self.concurrency = max(1, int(concurrency))
        self.poll = poll
        self.stopping = threading.Event()
        self._lock_file: IO[str] | None = None
        self._threads: dict[int, threading.Thread] = {}

    # ------------------------------------------------------------------ lifecycle
    def acquire(self) -> bool:
        """Take the per-db worker lock; False when another live worker has it."""
        f = open(lock_path(self.store), "a+")  # noqa: SIM115 - held for the worker's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        return True

    def recover(self) -> list[int]:
        """Stop children a dead worker left behind, then re-queue its jobs."""
        for job in self.store.list(state="running", limit=10_000):
            if job.worker_pid != os.getpid() and _alive(job.child_pid):
                _kill_group(job.child_pid)  # type: ignore[arg-type]
        return self.store.requeue_orphans(os.getpid())

    def run(self, once: bool = False) -> None:
        """Claim and run jobs until stopped (or, with once=True, until the queue is empty)."""
        if self._lock_file is None and not self.acquire():
            raise RuntimeError(f"another worker is already running for {self.store.path} "
                               f"(pid {worker_alive(self.store)})")
        for job_id in self.recover():
            print(f"re-queued job {job_id} left running by a dead worker", flush=True)
        while not self.stopping.is_set():
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            claimed = False
            if len(self._threads) < self.concurrency:
                job = self.store.claim_next(os.getpid())
                if job is not None:
                    claimed = True
                    t = threading.Thread(target=self._run_job_safely, args=(job,), name=f"job-{job.id}")
                    self._threads[job.id] = t
                    t.start()
            if once and not claimed and not self._threads:
                break
            if not claimed:
                self.stopping.wait(self.poll)
        for t in list(self._threads.values()):
            t.join()

    def stop(self) -> None:
        self.stopping.set()

    # ------------------------------------------------------------------ one job
    def _run_job_safely(self, job: Job) -> None:
        try:
            self._run_job(job)
        except Exception as e:  # noqa: BLE001 - a bug here must fail the job, never kill the worker
            self.store.finish(job.id, "failed", error=f"worker error: {type(e).__name__}: {e}")

    def _run_job(self, job: Job) -> None:
        store = self.store
        try:
            kind = get_kind(job.kind)
            cmd = kind.build(job.params, self.workspace)
        except ParamError as e:
            store.finish(job.id, "failed", error=str(e))
            return
        token = store.read_secret(job.id)
        env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if token:
            env["HF_TOKEN"] = token
        secrets = [token] if token else []
        if os.environ.get("HF_TOKEN"):
            secrets.append(os.environ["HF_TOKEN"])
        store.logs_dir.mkdir(parents=True, exist_ok=True)
        log = open(store.log_path(job.id), "a", encoding="utf-8")  # noqa: SIM115
        header = f"[jobs] attempt {job.attempts}: {' '.join(cmd.argv[1:])}"
        log.write(header + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=str(ROOT), env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        except OSError as e:
            log.close()
            store.finish(job.id, "failed", error=f"cannot start {cmd.argv[0]}: {e.strerror}")
            return
        store.update(job.id, message="started", log_lines=[header], child_pid=proc.pid)

        lines: queue.Queue[str | None] = queue.Queue()

        def reader() -> None:
            buf = b""
            assert proc.stdout is not None
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for part in parts:
                    lines.put(part.decode("utf-8", "replace"))
            if buf:
                lines.put(buf.decode("utf-8", "replace"))
            lines.put(None)

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        last_line = ""
        cancelled = stopped = eof = False
        last_cr_line: str | None = None
        while True:
            batch: list[str] = []
            deadline = time.time() + FLUSH_EVERY
            while time.time() < deadline:
                try:
                    item = lines.get(timeout=max(0.01, deadline - time.time()))
                except queue.Empty:
                    break
                if item is None:
                    eof = True
                    break
                batch.append(_scrub(item, secrets))
            progress = message = None
            keep: list[str] = []
            for ln in batch:
                if not ln.strip():
                    continue
                frac, msg = parse_progress(ln)
                if frac is not None:
                    progress, message = frac, msg or message
                    if ln.startswith("PROGRESS"):
                        last_cr_line = ln
                        continue  # protocol lines go to the progress field, not the log
                keep.append(ln)
                last_line = ln
            if keep:
                log.write("\n".join(keep) + "\n")
                log.flush()
            cancel = store.update(job.id, progress=progress, message=message, log_lines=keep)
            if cancel and not cancelled:
                cancelled = True
                store.update(job.id, message="cancelling...")
                _kill_group(proc.pid)
            if self.stopping.is_set() and not stopped and not cancelled:
                stopped = True
                _kill_group(proc.pid)
            if eof:
                break
        rc = proc.wait()
        log.write(f"[jobs] exit code {rc}\n")
        log.close()
        if cancelled:
            store.finish(job.id, "cancelled", message="cancelled")
        elif stopped:
            store.requeue(job.id, "worker stopped; re-queued")
        elif rc == 0:
            store.finish(job.id, "done", result=cmd.outputs, message="done")
        else:
            err = last_line or last_cr_line or f"{job.kind} exited with code {rc}"
            if rc < 0:
                err = f"{job.kind} was killed by signal {-rc}" + (f" (last output: {last_line})" if last_line else "")
            store.finish(job.id, "failed", error=err)


def main_worker(store: JobStore, workspace: Path, concurrency: int, once: bool) -> int:
    w = Worker(store, workspace, concurrency=concurrency)
    if not w.acquire():
        print(f"error: a worker is already running for {store.path} (pid {worker_alive(store)}); "
              "stop it first or use that one", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        w.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"worker {os.getpid()} serving {store.path} (workspace {workspace})", flush=True)
    w.run(once=once)
    return 0
