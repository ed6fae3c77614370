#!/usr/bin/env python3
"""One-pass convert_hf_to_gguf_strategy.py vs the two-step path users run today, on SmolLM2.

two-step: llama.cpp's convert_hf_to_gguf.py --outtype f16, then reference llama-quantize --tensor-type-file
          (the same plan, exported by our --export-tensor-type-file; all cores)
one-pass: convert_hf_to_gguf_strategy.py --strategy plan.yaml

Measured in the same run, alternating the two paths (the machine is shared; medians of --repeat runs).
Peak RSS is per process (os.wait4), the two-step peak being the larger of its two steps.
Targets: wall-time ratio (one-pass / two-step) <= 1.0, peak-RSS ratio <= 1.2.

    SMOLLM2_DIR=~/.cache/real-models/smollm2-bf16 python benchmarks/bench_convert.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WALL_TARGET = 1.0
RSS_TARGET = 1.2

# a Q4_K_M-like mix (what people hand-write for --tensor-type), with an IQ4_XS and a Q8_0 class
PLAN = """format: gguf-strategy/1
default_type: Q4_K
rules:
  - {pattern: 'ffn_down', type: Q6_K}
  - {pattern: 'attn_v', type: Q6_K}
  - {pattern: 'attn_k', type: IQ4_XS}
  - {pattern: 'token_embd', type: Q8_0}
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child must never block on it
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def tensor_types(path: Path) -> dict[str, str]:
    from llamacpp.upstream import activate

    activate()
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_DIR"), help="SmolLM2 checkpoint (default $SMOLLM2_DIR)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if not args.model or not Path(args.model, "config.json").is_file():
        print("error: pass --model DIR or set SMOLLM2_DIR (../shared/tools/make_real_model.py --smollm2)",
              file=sys.stderr)
        return 2

    from llamacpp.reference import find_reference
    from llamacpp.upstream import find_sources

    quantize = str(find_reference().tool("llama-quantize"))
    upstream = str(find_sources() / "convert_hf_to_gguf.py")
    ours = str(ROOT / "convert_hf_to_gguf_strategy.py")
    py = sys.executable

    with tempfile.TemporaryDirectory(dir=args.workdir) as td:
        tmp = Path(td)
        plan = tmp / "plan.yaml"
        plan.write_text(PLAN)
        types = tmp / "types.txt"
        subprocess.run([py, ours, args.model, "--strategy", str(plan), "--export-tensor-type-file", str(types)],
                       check=True, capture_output=True)
        one_w, one_r, two_w, two_r, step = [], [], [], [], []
        for i in range(args.repeat):
            paths = ["one", "two"] if i % 2 == 0 else ["two", "one"]
            for which in paths:
                if which == "one":
                    w, r = timed([py, ours, args.model, "--strategy", str(plan), "--outfile", str(tmp / "one.gguf")])
                    one_w.append(w)
                    one_r.append(r)
                else:
                    w1, r1 = timed([py, upstream, args.model, "--outtype", "f16", "--outfile", str(tmp / "f16.gguf")])
                    w2, r2 = timed([quantize, "--tensor-type-file", str(types), str(tmp / "f16.gguf"),
                                    str(tmp / "two.gguf"), "Q8_0"])
                    two_w.append(w1 + w2)
                    two_r.append(max(r1, r2))
                    step.append((w1, w2))
                    (tmp / "f16.gguf").unlink()
            print(f"run {i + 1}: one-pass {one_w[-1]:.2f}s {one_r[-1] / 2**20:.0f} MiB | two-step "
                  f"{two_w[-1]:.2f}s (convert {step[-1][0]:.2f}s + quantize {step[-1][1]:.2f}s) "
                  f"{two_r[-1] / 2**20:.0f} MiB", file=sys.stderr)
        same_types = tensor_types(tmp / "one.gguf") == tensor_types(tmp / "two.gguf")

    wall_ratio = statistics.median(one_w) / statistics.median(two_w)
    rss_ratio = statistics.median(one_r) / statistics.median(two_r)
    result = {
        "model": str(args.model), "repeat": args.repeat, "cpus": os.cpu_count(),
        "one_pass_s": round(statistics.median(one_w), 3), "two_step_s": round(statistics.median(two_w), 3),
        "one_pass_rss_mib": round(statistics.median(one_r) / 2**20, 1),
        "two_step_rss_mib": round(statistics.median(two_r) / 2**20, 1),
        "wall_ratio": round(wall_ratio, 3), "rss_ratio": round(rss_ratio, 3),
        "same_tensor_types": same_types,  # bytes differ: the two-step path quantizes F16-rounded weights
        "wall_target": WALL_TARGET, "rss_target": RSS_TARGET,
        "pass": wall_ratio <= WALL_TARGET and rss_ratio <= RSS_TARGET,
    }
    print(f"wall time ratio (one-pass / two-step): {wall_ratio:.3f} (target <= {WALL_TARGET})")
    print(f"peak RSS ratio  (one-pass / two-step): {rss_ratio:.3f} (target <= {RSS_TARGET})")
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
