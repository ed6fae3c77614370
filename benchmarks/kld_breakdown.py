#!/usr/bin/env python3
"""Where a calibrated plan's KLD comes from: the plan bench_quality.py writes at one stock size, probed with one
tensor class at a time left exact, with exact activations, and with the embedding one step up.

Why: a plan that misses a target (SmolLM2's Q5_K_M mean KLD, docs/quality.md) is only improved by attacking
its largest share. The shares come from end-to-end probes (verify.probe: the same held-out calibration text,
chunks and llama.cpp activation rounding as the plan selection), not from the calibration's per-tensor
predictions. Every probe is memoised in the bench cache, so a second run prints at once.

    SMOLLM2_DIR=~/.cache/real-models/smollm2-bf16 python benchmarks/kld_breakdown.py --mix Q5_K_M --checkpoint 0.5p

Options not listed here are bench_quality.py's (the plan is the one a bench run with the same options selects).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality as bq  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = bq.build_parser()
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--mix", default="Q5_K_M", help="the stock mix whose file size is the budget")
    ap.add_argument("--checkpoint", default=None,
                    help="one checkpoint spec of --smooth (0, 0.5, 0.5p...); default: the first of --smooth")
    ap.add_argument("--up-type", default="Q8_0", help="type tried for the token embedding (the step above its own)")
    a = ap.parse_args(argv)
    for path, what in ((Path(a.model).expanduser() / "config.json", "model (set SMOLLM2_DIR)"),
                       (Path(a.calibration_text), "calibration text")):
        if not path.is_file():
            print(f"error: {path}: {what} not found", file=sys.stderr)
            return 2
    spec = (a.checkpoint or a.smooth.split(",")[0]).strip()
    try:
        alpha, order = float(spec.removesuffix("p")), spec.endswith("p")
    except ValueError:
        raise SystemExit(f"error: --checkpoint {spec!r}: write an alpha such as 0, 0.5 or 0.5p") from None
    mix = a.mix.strip().upper()
    if mix not in bq.MIXES:
        raise SystemExit(f"error: --mix {mix}: one of {', '.join(bq.MIXES)}")
    b = bq.Bench(a, smooth=alpha, order=order and alpha > 0)
    target = b.stock(mix).stat().st_size
    ctx = bq.pipeline(b, a)
    res = b.select_plan(mix, target, ctx, b.build_kw(mix, "cal", ctx))
    assign = res.cands.types_of(res.choice)  # the selected and refined plan, as converted
    _, imatrix = b.ours()
    probe = ctx["probe"]  # memoised, with llama.cpp's activation rounding when --probe-emulate (the default)
    exact_acts = b.selection_probe(imatrix, emulate=False)

    from strategy.names import tensor_class

    by_class: dict[str, list[str]] = defaultdict(list)
    for name in assign:
        by_class[tensor_class(name)].append(name)
    c = res.cands
    size_of = {n: int(c.nbytes[i, j]) for i, (n, j) in enumerate(zip(c.names, res.choice))}
    whole = probe(assign)
    rows = [("as planned", whole, None), ("exact activations (no 8-bit rounding of matmul inputs)",
                                           exact_acts(assign), None)]
    for cls in sorted(by_class, key=lambda k: -sum(size_of[n] for n in by_class[k])):
        members = set(by_class[cls])
        rest = {n: t for n, t in assign.items() if n not in members}
        mib = sum(size_of[n] for n in by_class[cls]) / 2**20
        rows.append((f"{cls} exact ({len(by_class[cls])} tensors, {mib:.1f} MiB in the plan)", probe(rest), cls))
    embd = "token_embd.weight"
    if embd in assign and assign[embd] != a.up_type:
        rows.append((f"{embd} at {a.up_type} instead of {assign[embd]} (over the budget)",
                     probe({**assign, embd: a.up_type}), None))
        rows.append((f"{embd} alone at {assign[embd]}, everything else exact", probe({embd: assign[embd]}), None))

    print(f"\n{mix}-size calibrated plan of checkpoint {b.label} ({res.size} bytes, budget {target}); probe KLD on "
          f"{a.probe_chunks} x {a.probe_ctx} tokens of the calibration text's held-out part")
    print(f"{'variant':70s} {'probe KLD':>9s} {'change':>8s}")
    for label, kld, _ in rows:
        change = "" if label == "as planned" else f"{(kld - whole) / whole:+.1%}"
        print(f"{label:70s} {kld:9.5f} {change:>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
