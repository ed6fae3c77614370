"""`python -m webui [--host 127.0.0.1] [--port 8765] [--workspace DIR] [--no-worker]`."""

from __future__ import annotations

import argparse
import sys

from webui.server import serve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m webui", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    ap.add_argument("--workspace", default="workspace", help="folder holding models, measurements, plans, GGUFs")
    ap.add_argument("--no-worker", action="store_true", help="do not start a job worker (run `python -m jobs worker`)")
    a = ap.parse_args(argv)
    try:
        serve(a.workspace, a.host, a.port, start_worker=not a.no_worker)
    except OSError as e:
        print(f"error: cannot listen on {a.host}:{a.port} ({e.strerror}); pick another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
