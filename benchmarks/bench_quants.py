#!/usr/bin/env python3
"""Quantization throughput: our numpy quantizers (quants.quantize) vs libggml (single-threaded
ggml_quantize_chunk), same data, with and without an importance vector.

Target: ours >= 0.5x libggml per type (1.0x ambition). Prints one row per (type, importance) with
M weights/s for both, the ratio, and the share of blocks that came out byte-identical.

  python benchmarks/bench_quants.py                      # 1024 x 4096 gaussian-ish weights
  python benchmarks/bench_quants.py --real /tmp/smollm2  # SmolLM2 down_proj weights (1536 wide)
  python benchmarks/bench_quants.py --types q4_k,q2_k --rows 4096
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

import quants  # noqa: E402

T = GGMLQuantizationType
SKIP = (T.F32, T.F16, T.BF16)


def available_types(only: list[str] | None) -> list[tuple[GGMLQuantizationType, str | None]]:
    """(type, reason it is skipped or None) for WRITABLE_TYPES minus the float types."""
    wanted = [quants.parse_type(t) for t in only] if only else [t for t in quants.WRITABLE_TYPES if t not in SKIP]
    out = []
    for t in wanted:
        target = quants._OWN.get(t)
        reason = None
        if target is not None:
            try:
                importlib.import_module(target.split(":")[0])
            except ImportError as e:
                reason = f"module not importable yet ({e})"
        out.append((t, reason))
    return out


def load_data(args: argparse.Namespace) -> np.ndarray:
    if args.real:
        import torch  # noqa: F401  (safetensors' "pt" reader; bf16 has no numpy dtype)
        from safetensors import safe_open

        rows, need = [], args.rows * args.cols
        with safe_open(str(Path(args.real) / "model.safetensors"), "pt") as f:
            names = sorted(k for k in f.keys() if k.endswith("mlp.down_proj.weight"))
            for name in names:
                rows.append(f.get_tensor(name).float().numpy())
                if sum(r.size for r in rows) >= need:
                    break
        x = np.concatenate(rows, axis=0)
        return np.ascontiguousarray(x[: max(1, need // x.shape[1])], dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32) * 0.02
    x[:, rng.integers(0, args.cols, 8)] *= 20  # a few outlier columns, as real weights have
    return x


def timed(fn, repeat: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--real", metavar="DIR", help="SmolLM2 checkpoint dir (model.safetensors)")
    ap.add_argument("--types", help="comma-separated subset, e.g. q4_k,q5_k")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    args = ap.parse_args()

    from llamacpp.ggml import ggml_quantize
    from llamacpp.reference import ReferenceNotFound

    x = load_data(args)
    rng = np.random.default_rng(1)
    imp = rng.gamma(0.7, 1.0, x.shape[1]).astype(np.float32)
    print(f"data: {x.shape[0]} x {x.shape[1]} = {x.size / 1e6:.1f} M weights"
          + (f" from {args.real}" if args.real else " (synthetic)"))
    print(f"{'type':8} {'imatrix':7} {'ours M/s':>9} {'ggml M/s':>9} {'ratio':>6} {'identical':>9}")
    ratios = []
    for qtype, reason in available_types(args.types.split(",") if args.types else None):
        if reason:
            print(f"{qtype.name:8} skipped: {reason}")
            continue
        if x.shape[1] % GGML_QUANT_SIZES[qtype][0]:
            print(f"{qtype.name:8} skipped: row length {x.shape[1]} is not a multiple of the block size")
            continue
        for w in (None, imp):
            try:
                t_ref, ref = timed(lambda w=w, qtype=qtype: ggml_quantize(x, int(qtype), w), args.repeat)
            except ReferenceNotFound as e:
                print(f"libggml not found: {e}")
                return 1
            t_ours, ours = timed(lambda w=w, qtype=qtype: quants.quantize(x, qtype, w), args.repeat)
            ts = GGML_QUANT_SIZES[qtype][1]
            same = (np.asarray(ours).view(np.uint8).reshape(-1, ts) == ref.reshape(-1, ts)).all(axis=1).mean()
            r = t_ref / t_ours
            ratios.append(r)
            print(f"{qtype.name:8} {'yes' if w is not None else 'no':7} {x.size / t_ours / 1e6:9.2f} "
                  f"{x.size / t_ref / 1e6:9.2f} {r:6.2f} {100 * same:8.3f}%", flush=True)
    if ratios:
        print(f"min ratio {min(ratios):.2f} (target >= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
