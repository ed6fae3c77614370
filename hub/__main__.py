"""`python -m hub download REPO_ID [--local-dir DIR] [--revision REV] [--list]`.

The token is read from HF_TOKEN or the `hf auth login` cache (never from the command line, where `ps` shows it).
Progress lines: `PROGRESS <fraction> <done>/<total> MB <file>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hub.download import HubError, download, list_remote, select_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hub", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download (or resume) a repo's config, tokenizer and weights")
    d.add_argument("repo_id")
    d.add_argument("--local-dir", help="target folder (default models/OWNER__NAME)")
    d.add_argument("--revision", default="main")
    d.add_argument("--list", action="store_true", help="only print which files would be downloaded")
    a = ap.parse_args(argv)
    try:
        if a.list:
            _sha, files = list_remote(a.repo_id, a.revision)
            sizes = {f.path: f.size for f in files}
            for p in select_files(list(sizes)):
                print(f"{sizes[p]:>14,}  {p}")
            return 0
        out = Path(a.local_dir or f"models/{a.repo_id.replace('/', '__')}")
        download(a.repo_id, out, revision=a.revision)
        print(f"downloaded {a.repo_id} to {out}")
        return 0
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
