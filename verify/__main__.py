"""python -m verify --base base.gguf --text FILE cand1.gguf ... [--compare-uniform --model-dir HF_DIR] -o report/"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verify import VerifyError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m verify",
        description="Perplexity and KL-divergence of GGUF files against a base GGUF, as llama-perplexity "
                    "--kl-divergence computes them, with a table and a KLD-vs-size chart.")
    ap.add_argument("candidates", nargs="*", type=Path, help="GGUF files to evaluate")
    ap.add_argument("--base", type=Path, required=True, help="the reference GGUF (F32/BF16/F16 conversion)")
    ap.add_argument("--text", type=Path, required=True, help="UTF-8 evaluation text (at least 2 chunks)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="report directory (table, CSV, JSON, charts)")
    ap.add_argument("--engine", choices=("auto", "llamacpp", "torch"), default="auto",
                    help="llamacpp: the reference llama-perplexity; torch: pure Python; auto: llamacpp if found")
    ap.add_argument("--llama-cpp", default=None, help="llama-perplexity binary or llama.cpp build directory")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all of the text, as llama-perplexity)")
    ap.add_argument("--compare-uniform", action="store_true",
                    help="also evaluate uniform quants (and llama-quantize stock mixes when available)")
    ap.add_argument("--uniform", default="q8_0,q6_k,q4_k", help="uniform types for --compare-uniform")
    ap.add_argument("--stock", default="Q5_K_M,Q4_K_M,Q3_K_M",
                    help="llama-quantize mixes for --compare-uniform ('' for none)")
    ap.add_argument("--imatrix", type=Path, default=None, help="imatrix for the stock mixes")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="HF checkpoint: uniform quants by our converter; its tokenizer for the torch engine")
    ap.add_argument("--cache-dir", type=Path, default=None, help="base log-prob cache (default ~/.cache/...)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from verify.pipeline import run_pipeline
    from verify.report import format_table

    if args.ctx < 8:
        print(f"error: --ctx {args.ctx} is too small; use 128 or more", file=sys.stderr)
        return 2
    if not args.candidates and not args.compare_uniform:
        print("error: nothing to evaluate; give candidate GGUF files or --compare-uniform", file=sys.stderr)
        return 2
    try:
        rep = run_pipeline(
            args.base, args.text, args.candidates, engine=args.engine, llama_cpp=args.llama_cpp,
            model_dir=args.model_dir, n_ctx=args.ctx, n_chunks=args.chunks, compare_uniform=args.compare_uniform,
            uniform=[t for t in args.uniform.split(",") if t], stock=[t for t in args.stock.split(",") if t],
            imatrix=args.imatrix, out_dir=args.out, cache_dir=args.cache_dir, threads=args.threads,
            verbose=args.verbose)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or an unwritable report directory
        from outputs import os_error_line

        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(format_table(rep), end="")
    if args.out:
        print(f"report written to {args.out}/ (table.txt, results.csv, results.json, chart.html, chart.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
