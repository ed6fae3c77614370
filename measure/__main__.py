"""CLI.

    python -m measure MODEL_DIR [--imatrix F ...] [--combine mean|max|weighted] [--types Q8_0,Q4_K] --db FILE
    python -m measure imatrix MODEL_DIR --text FILE [--text FILE2 ...] -o imatrix.gguf [--ctx 512] [--chunks N]
    python -m measure sample MODEL_DIR -o samples.txt [--tokens 20480]
    python -m measure smooth MODEL_DIR --imatrix F -o SMOOTHED_DIR --imatrix-out F2 [--alpha 0.5] [--order-text T]
    python -m measure inspect MODEL_DIR [--imatrix F ...]
    python -m measure export --db FILE -o out.csv|out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBCOMMANDS = ("imatrix", "sample", "smooth", "inspect", "export")


def _user_errors() -> tuple[type[BaseException], ...]:
    from catalog import ModelInputError
    from measure.db import DBError
    from measure.hessian import HessianError
    from measure.imatrix import ImatrixError
    from measure.imatrix_compute import ImatrixComputeError
    from measure.permute import PermuteError
    from measure.sample import SampleError
    from measure.smooth import SmoothError
    from quants import QuantInputError

    return (ModelInputError, ImatrixError, DBError, QuantInputError, ImatrixComputeError, HessianError,
            SmoothError, PermuteError, SampleError, FileNotFoundError)


def _measure(argv: list[str]) -> int:
    from measure.roundtrip import parse_types
    from measure.run import run

    p = argparse.ArgumentParser(prog="python -m measure", description="Round-trip every tensor through every type.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--imatrix", nargs="+", action="extend", default=[], type=Path, help="imatrix file(s), GGUF or .dat")
    p.add_argument("--combine", default="mean", choices=["mean", "max", "weighted"])
    p.add_argument("--types", default=None, help="comma-separated, case-insensitive (default: the 14 candidates)")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quantizer", default="numpy", choices=["numpy", "ggml"],
                   help="numpy: the converter's own quantizers (default); ggml: the reference libggml-base, same "
                        "bytes, faster")
    p.add_argument("--sample", type=float, default=1.0,
                   help="fraction of each tensor's rows to round-trip (default 1: all; e.g. 0.25 estimates the "
                        "errors from a quarter of the rows, sizes stay exact)")
    p.add_argument("--hessian", type=Path, default=None,
                   help="input covariances (`python -m measure imatrix --hessian`): measure the error-compensated "
                        "encoding the converter writes with the same file")
    a = p.parse_args(argv)
    s = run(a.model_dir, a.db, imatrix_paths=a.imatrix, combine=a.combine, types=parse_types(a.types),
            workers=a.workers, progress=not a.no_progress, backend=a.quantizer, sample=a.sample,
            hessian_path=a.hessian)
    print(f"{s.db}: {s.n_tensors} tensors x {s.n_types} types: {s.computed} computed, {s.skipped} already done, "
          f"{s.not_applicable} not applicable, {s.seconds:.1f}s")
    return 0


def _imatrix(argv: list[str]) -> int:
    from measure.imatrix_compute import compute_imatrix

    p = argparse.ArgumentParser(prog="python -m measure imatrix", description="Compute an imatrix with torch.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--text", required=True, type=Path, action="append",
                   help="calibration text; repeat it to add another source (each gives up to --chunks chunks, "
                        "e.g. the model's own samples from `python -m measure sample`)")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=-1, help="chunks per text (default: all of each)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight, as llama-imatrix can")
    p.add_argument("--device", default=None)
    p.add_argument("--hessian", type=Path, default=None,
                   help="also write each weight's full input covariance here (safetensors), for error-compensated "
                        "encoding (--hessian of measure, convert and strategy)")
    p.add_argument("--embedding-rows", type=int, default=0, metavar="N",
                   help="with --hessian and a tied embedding: also store what gives its N most used rows a "
                        "covariance of their own in the converter (docs/quality.md; N=5000 measured on SmolLM2)")
    a = p.parse_args(argv)
    out = compute_imatrix(a.model_dir, a.text, a.output, ctx=a.ctx, chunks=a.chunks,
                          process_output=a.process_output, device=a.device, hessian_output=a.hessian,
                          embedding_rows=a.embedding_rows)
    print(f"wrote {out}" + (f" and {a.hessian}" if a.hessian else ""))
    return 0


def _sample(argv: list[str]) -> int:
    from measure.sample import sample_text

    p = argparse.ArgumentParser(prog="python -m measure sample",
                                description="Text sampled from the model itself: a second calibration source that "
                                            "keeps error-compensated encodings from fitting one text's style.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=20480, help="tokens to sample (default 20480: 40 chunks of 512)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per sample (use the imatrix's --ctx)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16, help="samples generated at once")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def show(done: int, total: int) -> None:
        print(f"\rsampled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    out = sample_text(a.model_dir, a.output, tokens=a.tokens, ctx=a.ctx, seed=a.seed, temperature=a.temperature,
                      batch=a.batch, device=a.device, progress=None if a.no_progress else show)
    print(f"wrote {out}")
    return 0


def _smooth(argv: list[str]) -> int:
    from measure.smooth import DEFAULT_ALPHA, smooth_checkpoint

    p = argparse.ArgumentParser(prog="python -m measure smooth",
                                description="Exact reparametrisation that makes llama.cpp's 8-bit activation rounding "
                                            "cheaper (SmoothQuant); later stages read the smoothed checkpoint.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--imatrix", required=True, type=Path, help="the model's imatrix (GGUF or .dat)")
    p.add_argument("-o", "--output", required=True, type=Path, help="smoothed checkpoint directory")
    p.add_argument("--imatrix-out", required=True, type=Path, help="the imatrix rescaled for the smoothed checkpoint")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="migration strength: 0 leaves activations alone, 1 moves all of their spread into weights")
    p.add_argument("--order-text", type=Path, default=None,
                   help="also reorder the hidden channels (exact) so that llama.cpp's 8-bit rounding of the head's "
                        "input and the embedding's 32-blocks lose less; statistics from this calibration text")
    p.add_argument("--order-chunks", type=int, default=6, help="chunks of --order-ctx tokens for --order-text")
    p.add_argument("--order-ctx", type=int, default=512)
    p.add_argument("--device", default=None, help="torch device for --order-text (default: cuda if available)")
    a = p.parse_args(argv)
    order = None
    if a.order_text is not None:
        import numpy as np

        from measure.permute import choose_order, collect_head_stats, order_cost
        from measure.smooth import check_smoothable

        check_smoothable(a.model_dir, a.output, a.alpha)  # user errors before the forward pass

        stats = collect_head_stats(a.model_dir, a.order_text, ctx=a.order_ctx, chunks=a.order_chunks,
                                   device=a.device)
        order = choose_order(stats)
        before, after = order_cost(stats, np.arange(order.size)), order_cost(stats, order)
        print(f"channel order: modelled head loss {before:.6f} -> {after:.6f} "
              f"({np.count_nonzero(order != np.arange(order.size))} of {order.size} channels moved)")
    r = smooth_checkpoint(a.model_dir, a.imatrix, a.output, a.imatrix_out, alpha=a.alpha, order=order)
    print(f"wrote {r.out_dir} ({r.sites} matmul inputs smoothed, alpha {r.alpha}"
          + (f", {len(r.skipped)} without imatrix data left alone" if r.skipped else "")
          + (", hidden channels reordered" if order is not None else "") + f") and {r.imatrix_out}")
    return 0


def _inspect(argv: list[str]) -> int:
    import catalog
    from measure.imatrix import load_imatrix

    p = argparse.ArgumentParser(prog="python -m measure inspect")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--imatrix", nargs="+", action="extend", default=[], type=Path)
    p.add_argument("--combine", default="mean", choices=["mean", "max", "weighted"])
    a = p.parse_args(argv)
    infos = catalog.list_tensors(a.model_dir)
    imat = load_imatrix(a.imatrix, a.combine) if a.imatrix else None
    if imat is not None:
        imat.check_model([(i.name, i.shape) for i in infos if i.quantizable])
    w = max(len(i.name) for i in infos)
    print(f"{'tensor':<{w}}  {'shape':<22} {'params':>12}  {'class':<16} {'quant':<5}  imatrix")
    for i in infos:
        cov = "-"
        if imat is not None:
            c = imat.coverage(i.name)
            cov = c.describe() if c else ("none" if i.quantizable else "-")
        print(f"{i.name:<{w}}  {'x'.join(map(str, i.shape)):<22} {i.n_params:>12,}  {i.cls:<16} "
              f"{'yes' if i.quantizable else 'no':<5}  {cov}")
    print(f"{len(infos)} tensors, {sum(i.n_params for i in infos):,} params, "
          f"{sum(1 for i in infos if i.quantizable)} quantizable")
    if imat is not None:
        flagged = [c for c in imat.flagged()]
        if flagged:
            print(f"{len(flagged)} imatrix entries with zero/partial counts (experts never routed to):")
            for c in flagged:
                print(f"  {c.name}: {c.describe()}")
    return 0


def _export(argv: list[str]) -> int:
    from measure.db import MeasurementDB

    p = argparse.ArgumentParser(prog="python -m measure export")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    a = p.parse_args(argv)
    if a.output.suffix.lower() not in (".csv", ".json"):
        raise FileNotFoundError(f"{a.output}: output must end in .csv or .json")
    with MeasurementDB(a.db, readonly=True) as db:
        out = db.export(a.output)
        n = len(db.measurements())
    print(f"wrote {n} measurements to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = {"imatrix": _imatrix, "sample": _sample, "smooth": _smooth, "inspect": _inspect,
           "export": _export}.get(argv[0] if argv else "", None)
    errors = _user_errors()
    try:
        return cmd(argv[1:]) if cmd else _measure(argv)
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or an unwritable output, wherever it was being written
        from outputs import os_error_line

        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly, as Unix tools do
    sys.exit(main())
