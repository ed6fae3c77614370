"""CLI.

    python -m tune QUANT.gguf --base MODEL_DIR|BASE.gguf --text calibration.txt [--text samples.txt] -o tuned.gguf
        [--steps 60] [--lr 1e-4] [--chunks 40] [--val-chunks 8] [--ctx 512] [--what scales,norms[,codes]]

The base is the float model the quantized file was converted from: an HF checkpoint directory (converted once
with llama.cpp's converter, cached) or a float GGUF. For a smoothed checkpoint, that checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("quant", type=Path, help="the quantized GGUF (convert_hf_to_gguf_strategy.py's output)")
    p.add_argument("--base", required=True, type=Path, help="HF checkpoint directory or float GGUF it came from")
    p.add_argument("--text", required=True, action="append", type=Path,
                   help="calibration text (repeat: e.g. the imatrix text and `measure sample` output)")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of --batch chunks (default 60)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam step, relative to each field (default 1e-4)")
    p.add_argument("--chunks", default="40",
                   help="chunks read from each text: one count for all, or one per --text, comma-separated "
                        "(e.g. 40,200: the imatrix's 40 chunks and 200 of the model's samples; default 40)")
    p.add_argument("--val-chunks", type=int, default=8, help="chunks held out to pick the best step (default 8)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--what", default="scales,norms",
                   help="scales (block d/m fields), norms (F32 norm vectors), codes (each weight's level code, "
                        "straight through its rounding; docs/tuning.md)")
    p.add_argument("--code-lr", type=float, default=0.003,
                   help="Adam step for codes, in levels per step (a code changes after half a level; default 0.003)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p


def _chunk_counts(spec: str, n_texts: int) -> list[int]:
    from tune import TuneError

    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise TuneError(f"--chunks {spec}: give a count, or one count per --text, comma-separated") from None
    if len(counts) == 1:
        counts *= n_texts
    if len(counts) != n_texts or min(counts) < 1:
        raise TuneError(f"--chunks {spec}: give one positive count, or one per --text ({n_texts} given)")
    return counts


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from quants import QuantInputError
    from tune import TuneError
    from verify import VerifyError

    try:
        from tune.train import tune_gguf

        base = a.base
        if base.is_dir():
            from verify.probe import gguf_for_model_dir

            base = gguf_for_model_dir(base)
        for p in (a.quant, base, *a.text):
            if not Path(p).is_file():
                raise TuneError(f"{p}: no such file")
        if a.output.resolve() == a.quant.resolve():
            raise TuneError(f"{a.output}: the output would overwrite the input; choose another -o")
        chunks = _chunk_counts(a.chunks, len(a.text))
        res = tune_gguf(a.quant, base, a.text, a.output, steps=a.steps, lr=a.lr, ctx=a.ctx, chunks=chunks,
                        val_chunks=a.val_chunks, batch=a.batch, what=[w.strip() for w in a.what.split(",") if w.strip()],
                        code_lr=a.code_lr,
                        eval_every=max(1, a.eval_every), seed=a.seed, threads=a.threads,
                        log=lambda s: print(s, flush=True))
    except (TuneError, VerifyError, QuantInputError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:
        from outputs import os_error_line

        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    print(res.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
