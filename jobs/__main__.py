"""`python -m jobs list|show|cancel|submit|worker` over the job database of a workspace."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jobs.kinds import KINDS, ParamError, get_kind
from jobs.store import JobError, JobStore


def default_db(workspace: Path) -> Path:
    return workspace / "jobs" / "jobs.sqlite"


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs", description=__doc__)
    ap.add_argument("--workspace", default="workspace", help="workspace folder (default ./workspace)")
    ap.add_argument("--db", help="job database (default WORKSPACE/jobs/jobs.sqlite)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list jobs, newest first")
    ls.add_argument("--state")
    ls.add_argument("--json", action="store_true")
    sh = sub.add_parser("show", help="one job with its log tail")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    ca = sub.add_parser("cancel", help="cancel a queued or running job")
    ca.add_argument("id", type=int)
    su = sub.add_parser("submit", help="queue a job: submit KIND key=value ... (values may be JSON)")
    su.add_argument("kind", choices=sorted(KINDS))
    su.add_argument("params", nargs="*", metavar="key=value")
    wk = sub.add_parser("worker", help="run queued jobs (one worker per database)")
    wk.add_argument("--concurrency", type=int, default=1)
    wk.add_argument("--once", action="store_true", help="exit when the queue is empty")
    a = ap.parse_args(argv)

    workspace = Path(a.workspace).resolve()
    store = JobStore(Path(a.db) if a.db else default_db(workspace))
    try:
        if a.cmd == "list":
            jobs = store.list(state=a.state)
            if a.json:
                print(json.dumps([j.to_dict() for j in jobs], indent=1))
                return 0
            for j in jobs:
                print(f"{j.id:>5}  {j.kind:<9} {j.state:<9} {j.progress * 100:5.1f}%  {_fmt_time(j.created)}  "
                      f"{(j.error or j.message)[:80]}")
            return 0
        if a.cmd == "show":
            j = store.get(a.id)
            if a.json:
                print(json.dumps(j.to_dict(), indent=1))
                return 0
            print(f"job {j.id}: {j.kind} {j.state} {j.progress * 100:.1f}% {j.message}")
            print(f"  params:  {json.dumps(j.params)}")
            print(f"  created: {_fmt_time(j.created)}  started: {_fmt_time(j.started)}  "
                  f"finished: {_fmt_time(j.finished)}  attempts: {j.attempts}")
            if j.result:
                print(f"  result:  {json.dumps(j.result)}")
            if j.error:
                print(f"  error:   {j.error}")
            for ln in j.log_tail:
                print(f"  | {ln}")
            return 0
        if a.cmd == "cancel":
            j = store.request_cancel(a.id)
            print(f"job {j.id}: {'cancelled' if j.state == 'cancelled' else 'cancel requested'}")
            return 0
        if a.cmd == "submit":
            params = {}
            for kv in a.params:
                if "=" not in kv:
                    raise ParamError(f"parameter {kv!r} should be key=value")
                k, v = kv.split("=", 1)
                try:
                    params[k] = json.loads(v)
                except json.JSONDecodeError:
                    params[k] = v
            get_kind(a.kind).build(params, workspace)  # reject bad params now, not in the worker
            print(store.submit(a.kind, params))
            return 0
        if a.cmd == "worker":
            from jobs.worker import main_worker

            return main_worker(store, workspace, a.concurrency, a.once)
    except (JobError, ParamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
