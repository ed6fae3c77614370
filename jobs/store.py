"""The job store: one sqlite file (WAL) that the worker, the web UI and the CLI all read and write.

Why sqlite: several processes (UI server, worker, `python -m jobs`) share state without a daemon, and WAL lets
readers poll progress while the worker writes. Every call opens its own short connection, so the store is safe
to use from threads and from processes that are killed at any moment (sqlite's journal keeps the file sound).

Secrets (a Hugging Face token typed into the UI) are never written here: they go to a 0600 file next to the
database (`secrets/<job id>`), read by the worker into the child's environment, and deleted when the job ends.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
LOG_TAIL_LINES = 60
MAX_ATTEMPTS = 5  # a job re-queued this many times after worker deaths is failed instead of looping forever

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'queued',
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    updated REAL NOT NULL,
    heartbeat REAL,
    worker_pid INTEGER,
    child_pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    log_tail TEXT NOT NULL DEFAULT '',
    error TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
"""


class JobError(ValueError):
    """A request the store cannot honour (unknown job id, cancelling a finished job...)."""


@dataclass
class Job:
    id: int
    kind: str
    params: dict[str, Any]
    state: str
    progress: float
    message: str
    created: float
    started: float | None
    finished: float | None
    updated: float
    heartbeat: float | None
    worker_pid: int | None
    child_pid: int | None
    attempts: int
    cancel_requested: bool
    log_tail: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        d["log_tail"] = d["log_tail"].splitlines() if d["log_tail"] else []
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


class JobStore:
    """CRUD and state transitions for jobs; every transition is one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front so read-modify-write cannot interleave."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    @property
    def secrets_dir(self) -> Path:
        return self.path.parent / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.path.parent / "logs"

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    # ------------------------------------------------------------------ queries
    def get(self, job_id: int) -> Job:
        with self._conn() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"no job with id {job_id} in {self.path} (see `python -m jobs list`)")
        return Job.from_row(row)

    def list(self, state: str | None = None, kind: str | None = None, limit: int = 200) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state:
            sql += " AND state=?"
            args.append(state)
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        with self._conn() as c:
            return [Job.from_row(r) for r in c.execute(sql, args).fetchall()]

    # ------------------------------------------------------------------ transitions
    def submit(self, kind: str, params: dict[str, Any] | None = None, secret: str | None = None) -> int:
        """Queue a job; `secret` (a token) is kept out of the database in a 0600 file the worker reads."""
        now = time.time()
        with self._tx() as c:
            cur = c.execute("INSERT INTO jobs(kind, params, state, created, updated) VALUES (?,?,?,?,?)",
                            (kind, json.dumps(params or {}, sort_keys=True), "queued", now, now))
            job_id = int(cur.lastrowid)
        if secret:
            self.write_secret(job_id, secret)
        return job_id

    def write_secret(self, job_id: int, secret: str) -> None:
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        p = self.secrets_dir / str(job_id)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)

    def read_secret(self, job_id: int) -> str | None:
        try:
            return (self.secrets_dir / str(job_id)).read_text().strip() or None
        except OSError:
            return None

    def drop_secret(self, job_id: int) -> None:
        (self.secrets_dir / str(job_id)).unlink(missing_ok=True)

    def claim_next(self, worker_pid: int, kinds: list[str] | None = None) -> Job | None:
        """Atomically move the oldest queued job to running for this worker."""
        now = time.time()
        with self._tx() as c:
            sql = "SELECT id FROM jobs WHERE state='queued'"
            args: list[Any] = []
            if kinds:
                sql += f" AND kind IN ({','.join('?' * len(kinds))})"
                args += kinds
            row = c.execute(sql + " ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state='running', started=COALESCE(started, ?), updated=?, heartbeat=?, "
                      "worker_pid=?, attempts=attempts+1, error=NULL WHERE id=?",
                      (now, now, now, worker_pid, row["id"]))
        return self.get(row["id"])

    def update(self, job_id: int, *, progress: float | None = None, message: str | None = None,
               log_lines: list[str] | None = None, child_pid: int | None = None) -> bool:
        """Progress/log/heartbeat from the worker. Returns whether a cancel has been requested."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT log_tail, cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return True
            sets, args = ["updated=?", "heartbeat=?"], [now, now]
            if progress is not None:
                sets.append("progress=?")
                args.append(min(1.0, max(0.0, float(progress))))
            if message is not None:
                sets.append("message=?")
                args.append(message[:500])
            if log_lines:
                tail = (row["log_tail"].splitlines() if row["log_tail"] else []) + [ln[:1000] for ln in log_lines]
                sets.append("log_tail=?")
                args.append("\n".join(tail[-LOG_TAIL_LINES:]))
            if child_pid is not None:
                sets.append("child_pid=?")
                args.append(child_pid)
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*args, job_id))
            return bool(row["cancel_requested"])

    def finish(self, job_id: int, state: str, *, error: str | None = None,
               result: dict[str, Any] | None = None, message: str | None = None) -> None:
        if state not in FINAL_STATES:
            raise JobError(f"finish() needs one of {FINAL_STATES}, got {state!r}")
        now = time.time()
        with self._tx() as c:
            c.execute("UPDATE jobs SET state=?, finished=?, updated=?, error=?, result=?, child_pid=NULL, "
                      "progress=CASE WHEN ?='done' THEN 1.0 ELSE progress END, message=COALESCE(?, message) "
                      "WHERE id=?",
                      (state, now, now, error, json.dumps(result) if result is not None else None, state,
                       message, job_id))
        self.drop_secret(job_id)

    def request_cancel(self, job_id: int) -> Job:
        """A queued job is cancelled at once; a running one is flagged and its worker stops the process."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id=?", (int(job_id),)).fetchone()
            if row is None:
                raise JobError(f"no job with id {job_id} in {self.path} (see `python -m jobs list`)")
            if row["state"] in FINAL_STATES:
                raise JobError(f"job {job_id} is already {row['state']}; nothing to cancel")
            if row["state"] == "queued":
                c.execute("UPDATE jobs SET state='cancelled', cancel_requested=1, finished=?, updated=?, "
                          "message='cancelled before it started' WHERE id=?", (now, now, job_id))
            else:
                c.execute("UPDATE jobs SET cancel_requested=1, updated=? WHERE id=?", (now, job_id))
        if row["state"] == "queued":
            self.drop_secret(int(job_id))
        return self.get(job_id)

    def requeue(self, job_id: int, note: str) -> None:
        """Back to the queue (the worker is shutting down cleanly): the next worker resumes it."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT log_tail FROM jobs WHERE id=?", (job_id,)).fetchone()
            tail = (row["log_tail"].splitlines() if row and row["log_tail"] else []) + [f"[jobs] {note}"]
            c.execute("UPDATE jobs SET state='queued', updated=?, worker_pid=NULL, child_pid=NULL, message=?, "
                      "log_tail=? WHERE id=? AND state='running'",
                      (now, note, "\n".join(tail[-LOG_TAIL_LINES:]), job_id))

    def requeue_orphans(self, live_worker_pid: int) -> list[int]:
        """Running jobs not owned by the live worker were left by a dead one: queue them again (or fail them
        after MAX_ATTEMPTS), so resumable stages continue from what they saved."""
        now = time.time()
        moved: list[int] = []
        with self._tx() as c:
            rows = c.execute("SELECT id, attempts, cancel_requested, log_tail FROM jobs WHERE state='running' "
                             "AND (worker_pid IS NULL OR worker_pid != ?)", (live_worker_pid,)).fetchall()
            for r in rows:
                tail = (r["log_tail"].splitlines() if r["log_tail"] else [])
                if r["cancel_requested"]:
                    c.execute("UPDATE jobs SET state='cancelled', finished=?, updated=?, child_pid=NULL WHERE id=?",
                              (now, now, r["id"]))
                elif r["attempts"] >= MAX_ATTEMPTS:
                    c.execute("UPDATE jobs SET state='failed', finished=?, updated=?, child_pid=NULL, error=? "
                              "WHERE id=?", (now, now, f"interrupted {r['attempts']} times (worker died each time); "
                                             "resubmit it once the cause is fixed", r["id"]))
                else:
                    tail.append(f"[jobs] worker died during attempt {r['attempts']}; re-queued")
                    c.execute("UPDATE jobs SET state='queued', updated=?, worker_pid=NULL, child_pid=NULL, "
                              "message='re-queued after worker restart', log_tail=? WHERE id=?",
                              (now, "\n".join(tail[-LOG_TAIL_LINES:]), r["id"]))
                    moved.append(int(r["id"]))
        return moved
