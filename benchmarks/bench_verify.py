#!/usr/bin/env python3
"""verify/ on SmolLM2: the torch engine vs the reference llama-perplexity (agreement and speed ratio, both
measured in this run), the probe API's timing, and optionally the full report with uniform/stock quants.

    SMOLLM2_DIR=~/.cache/real-models/smollm2-bf16 python benchmarks/bench_verify.py [--chunks 4] [--report DIR]

Prints: PPL/KLD of a llama-quantize Q4_K_M by both engines (target: PPL within 1%), seconds per engine and
their ratio, probe session setup and one-probe seconds (target from issue #6: seconds, not minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("SMOLLM2_DIR") or str(
        Path.home() / ".cache" / "real-models" / "smollm2-bf16"))
    ap.add_argument("--text", default=str(SHARED / "sotu-1990-2021.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--probe-tensor", default="blk.15.ffn_down.weight")
    ap.add_argument("--report", type=Path, default=None, help="also write the full report (uniform + stock) here")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)

    from llamacpp.reference import find_reference
    from verify import VerifyError
    from verify.llamacpp_engine import LlamaCppEngine
    from verify.probe import ProbeSession, gguf_for_model_dir
    from verify.torch_engine import TorchEngine

    model, text = Path(a.model).expanduser(), Path(a.text)
    if not (model / "config.json").is_file() or not text.is_file():
        print(f"error: need a model dir ({model}) and a text ({text}); set SMOLLM2_DIR", file=sys.stderr)
        return 2
    try:
        base = gguf_for_model_dir(model)
        ref = find_reference()
        with tempfile.TemporaryDirectory(prefix="bench-verify-") as td:
            cand = Path(td) / "q4_k_m.gguf"
            subprocess.run([str(ref.tool("llama-quantize")), str(base), str(cand), "Q4_K_M"], check=True,
                           capture_output=True)
            rows = {}
            for eng in (LlamaCppEngine(threads=a.threads), TorchEngine(threads=a.threads)):
                t0 = time.time()
                raw = Path(td) / f"base-{eng.name}.kld"
                info = eng.run_base(base, text, a.ctx, a.chunks, raw)
                t1 = time.time()
                m = eng.compare(cand, raw, a.ctx, text)
                rows[eng.name] = (info, m, t1 - t0, time.time() - t1)
        print(f"\nSmolLM2 {base.name} on {text.name}, {a.chunks} x {a.ctx} tokens; candidate llama-quantize Q4_K_M")
        print(f"{'engine':9s} {'base PPL':>9s} {'Q4_K_M PPL':>10s} {'mean KLD':>9s} {'99.9% KLD':>9s} "
              f"{'same top':>8s} {'base s':>7s} {'cand s':>7s}")
        for name, (info, m, tb, tc) in rows.items():
            print(f"{name:9s} {info['ppl']:9.4f} {m.ppl:10.4f} {m.kld_mean:9.5f} {m.kld_p999:9.4f} "
                  f"{m.same_top:7.2f}% {tb:7.1f} {tc:7.1f}")
        (bi_l, m_l, tb_l, tc_l), (bi_t, m_t, tb_t, tc_t) = rows["llamacpp"], rows["torch"]
        d_base = abs(bi_t["ppl"] / bi_l["ppl"] - 1)
        d_cand = abs(m_t.ppl / m_l.ppl - 1)
        print(f"\nPPL agreement: base {100 * d_base:.3f}%, Q4_K_M {100 * d_cand:.3f}% (target < 1%): "
              f"{'PASS' if max(d_base, d_cand) < 0.01 else 'FAIL'}")
        print(f"mean KLD torch/llama.cpp: {m_t.kld_mean / m_l.kld_mean:.3f}")
        print(f"speed: torch engine takes {(tb_t + tc_t) / (tb_l + tc_l):.2f}x the time of llama-perplexity")

        t0 = time.time()
        s = ProbeSession(model, text, n_ctx=a.ctx, n_chunks=a.chunks, threads=a.threads)
        setup = time.time() - t0
        r1 = s.probe({a.probe_tensor: "q4_0"})
        r2 = s.probe({a.probe_tensor: "q4_0"}, from_layer=0)
        print(f"\nprobe API: session setup {setup:.1f}s (load, base pass, hidden states); one probe of "
              f"{a.probe_tensor} -> Q4_0: {r1.seconds:.1f}s (from layer {r1.start_layer}; "
              f"{r2.seconds:.1f}s as a full forward), KLD {r1.kld_mean:.6f}")
        print(f"probe target (seconds, not minutes, for {a.chunks} x {a.ctx}): "
              f"{'PASS' if r1.seconds < 60 else 'FAIL'}")
        if a.report:
            from verify.pipeline import run_pipeline
            from verify.report import format_table

            rep = run_pipeline(base, text, [], engine="llamacpp", model_dir=model, n_ctx=a.ctx, n_chunks=a.chunks,
                               compare_uniform=True, out_dir=a.report, threads=a.threads)
            print()
            print(format_table(rep), end="")
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
