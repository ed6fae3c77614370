"""python -m strategy: build, calibrate, show, diff and export per-tensor quantization plans.

    python -m strategy build --db m.db --model DIR --target-size 2.5GiB -o plan.yaml
    python -m strategy build --db m.db --model DIR --knee -o plan.yaml
    python -m strategy calibrate --db m.db --model DIR --text eval.txt -o calibration.json
    python -m strategy show plan.yaml
    python -m strategy diff a.yaml b.yaml
    python -m strategy export plan.yaml --tensor-type-file types.txt [--model DIR]

User errors print one line and exit with status 2; a plan that loses the end-to-end check against the
stock-like mix of the same size exits with status 3 (the plan is written, marked as losing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from outputs import os_error_line, write_atomic
from strategy.plan import PlanError, load_plan, save_plan, tensor_type_file_lines, validate_plan
from strategy.problem import StrategyError
from strategy.sizes import SizeError, format_size, parse_size


def _err(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="measurement db (measure.db) or a JSON/JSONL dump of Measurement rows")
    p.add_argument("--model", help="HF model dir: tensor list incl. F32 tensors, for exact file sizes")
    p.add_argument("--metas", help="JSON list of tensors (name, shape, quantizable, fixed_type) instead of --model")
    p.add_argument("--base-gguf", help="any GGUF of this model: exact metadata (kv) bytes")
    p.add_argument("--metadata-bytes", type=int, help="kv-section bytes, when known")


def _constraints(a: argparse.Namespace):
    from strategy.constraints import Constraints, parse_type_map

    d: dict = {}
    if getattr(a, "constraints", None):
        import yaml

        try:
            d = yaml.safe_load(Path(a.constraints).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise StrategyError(f"{a.constraints}: cannot read constraints ({e})") from None
    c = Constraints.from_dict(d, source=getattr(a, "constraints", None) or "<cli>")
    c.floors.update(parse_type_map(a.floor or [], "floor"))
    c.ceilings.update(parse_type_map(a.ceiling or [], "ceiling"))
    c.pins.update(parse_type_map(a.pin or [], "pin"))
    c.no_imatrix.update(a.no_imatrix or [])
    if not (c.floors or c.ceilings or c.pins or c.no_imatrix or c.allowed_types):
        return None
    return c


def _default_calibration(db: str) -> Path:
    return Path(db).with_name("calibration.json")


def cmd_build(a: argparse.Namespace) -> int:
    from strategy.build import build, load_measurements, load_metas, metadata_bytes_for

    t0 = time.perf_counter()
    meas = load_measurements(a.db)
    metas = load_metas(a.model, a.metas)
    kv = metadata_bytes_for(a.model, a.base_gguf, a.metadata_bytes)
    cal = None
    cal_path = Path(a.calibration) if a.calibration else _default_calibration(a.db)
    if a.calibration or (cal_path.exists() and not a.uncalibrated):
        from strategy.calibrate import Calibration

        cal = Calibration.load(cal_path)
        print(f"calibration: {cal_path} (proxy {cal.proxy}, held-out Spearman "
              f"{cal.report.get('spearman_heldout', float('nan')):.3f})")
        if cal.proxy == "out" and not a.imatrix:
            return _err(f"{cal_path}: this calibration uses the 'out' proxy (error x activation energy); "
                        f"pass the same --imatrix it was fitted with")
    method = a.method or ("knee" if a.knee else "budget")
    if a.refine and (not a.check_text or a.no_select or method != "budget" or cal is None):
        return _err("--refine measures plans: it needs --check-text, a calibration and the budget method "
                    "(and not --no-select)")
    if a.knee and method != "knee":
        return _err("--knee builds a knee plan; drop --method or use --method knee")
    if method != "knee" and a.target_size is None and a.target_bpw is None and method != "stock":
        return _err(f"--method {method} needs --target-size (e.g. 2.5GiB) or --target-bpw (e.g. 4.5)")
    target_size = parse_size(a.target_size) if a.target_size is not None else None
    model = {"name": Path(a.model).name} if a.model else {}
    cons = _constraints(a)
    importance = groups = None
    if a.imatrix:
        from measure.imatrix import load_imatrix
        from strategy.build import imatrix_facts
        from strategy.constraints import Constraints

        if metas is None:
            return _err("--imatrix needs --model (or --metas) to match imatrix entries to tensor shapes")
        facts = imatrix_facts(load_imatrix(a.imatrix), metas)
        cons = cons or Constraints()
        cons.no_imatrix |= facts.no_imatrix
        importance, groups = facts.importance, facts.groups or None
        print(f"imatrix: {len(facts.importance)} tensors covered, {len(facts.no_imatrix)} without full coverage "
              f"(limited to types safe without one), {len(facts.groups)} tied groups")
    res = build(meas, metas, method=method, target_size=target_size, target_bpw=a.target_bpw,
                knee_tolerance=a.knee_tolerance, calibration=cal, constraints=cons,
                metadata_bytes=kv, model=model, stock_mix=a.stock_mix, importance=importance, groups=groups,
                plan_file_name=Path(a.output).name, log=print)
    if method == "budget" and cal is not None and a.check_text and not a.no_select and metas is not None:
        res = _select(a, res, meas, metas, kv, cal, cons, importance, groups, target_size, method)
    dt = time.perf_counter() - t0
    for m in res.messages:
        print(f"note: {m}")
    tgt = res.plan.target
    print(f"{method}: {len(res.plan.tensors)} tensors, {res.size} bytes ({format_size(res.size)}), "
          f"{tgt['bpw']} bpw, predicted loss {tgt['predicted_loss']}"
          + (f" (target {tgt['bytes']} bytes, {100 * res.size / tgt['bytes']:.3f}% used)" if "bytes" in tgt else "")
          + f" in {dt:.2f} s")
    code = 0
    if method != "stock" and metas is not None:
        code = _stock_check(a, res, meas, metas, kv, cal, cons, importance)
    save_plan(res.plan, a.output)
    print(f"wrote {a.output}")
    return code


def _select(a, res, meas, metas, kv, cal, cons, importance, groups, target_size, method):
    """Build one plan per calibration variant (proxy), probe each and the stock-like mix that fits end to end on
    --check-text, write the lowest KLD, refined with --refine (strategy.select.choose_plan)."""
    from strategy.build import build, stock_choice
    from strategy.select import choose_plan

    engine = _probe_engine(a)
    if engine is None:
        print("select: no verify engine available; keeping the calibration's own choice of proxy")
        return res
    kw = dict(constraints=cons, metadata_bytes=kv, model=res.plan.model, importance=importance,
              plan_file_name=Path(a.output).name)
    results = {f"calibrated ({cal.proxy})": res}
    for p, v in cal.variants().items():
        if p != cal.proxy:
            results[f"calibrated ({p})"] = build(meas, metas, method=method, target_size=target_size,
                                                 target_bpw=a.target_bpw, calibration=v, groups=groups, **kw)
    try:
        ch, mix = stock_choice(res.cands, metas, budget=res.plan.target.get("bytes"))
        stock = (mix, ch)
    except StrategyError:
        stock = None
    print(f"select: probing {len(results) + (stock is not None)} candidate plans on {a.check_chunks} chunks of "
          f"{a.check_text}")
    chosen, record = choose_plan(results, engine, budget=res.plan.target.get("bytes"), stock=stock,
                                 build_stock=lambda m: build(meas, metas, method="stock", stock_mix=m, **kw),
                                 refine_rounds=a.refine, judge=(lambda: _judge_engine(a)) if a.judge_chunks > 0 else None,
                                 log=print)
    if record["chosen"] not in results:
        print(f"select: the {record['chosen']} mix measured best; writing it (no calibrated plan beat it)")
    print(f"select: chose {record['chosen']}")
    return chosen


def _judge_engine(a):
    print(f"judge: the refinement changed the plan; measuring it and its start on up to {a.judge_chunks} chunks of "
          f"{a.check_text} after the {a.check_chunks} probe chunks")
    try:
        return _probe_engine(a, judge=True)
    except StrategyError as e:
        raise StrategyError(f"{e} (the refinement's judge reads --judge-chunks after the --check-chunks; lower them, "
                            f"or --judge-chunks 0 to keep the refined plan unjudged)") from None


def _stock_check(a, res, meas, metas, kv, cal, cons=None, importance=None) -> int:
    """Compare with the stock-like mix closest in size: predicted always, end to end when verify can probe."""
    from strategy.build import build, stock_choice

    c = res.cands
    try:
        ch, mix = stock_choice(c, metas, budget=res.size + max(1, res.size // 50))
    except StrategyError as e:
        print(f"stock check: skipped ({e})")
        return 0
    stock_size = c.size_of(ch)
    print(f"stock check: closest stock-like mix {mix} is {stock_size} bytes; predicted loss "
          f"{c.loss_of(ch):.6g} (stock) vs {res.predicted_loss:.6g} (this plan at {res.size} bytes)")
    engine = _probe_engine(a)
    if engine is None:
        print("stock check: no verify engine available (pass --check-text with verify.probe installed); "
              "the plan is NOT checked end to end against stock")
        return 0
    same = build(meas, metas, method=res.plan.method if res.plan.method in ("budget", "ashq1") else "budget",
                 target_size=stock_size, calibration=cal, metadata_bytes=kv, constraints=cons,
                 importance=importance)
    k_plan = float(engine(same.cands.types_of(same.choice)))
    k_stock = float(engine(c.types_of(ch)))
    winner = "plan" if k_plan <= k_stock else "stock"
    res.plan.target["check"] = {"stock_mix": mix, "size": stock_size, "kld_plan_at_stock_size": k_plan,
                                "kld_stock": k_stock, "winner": winner}
    print(f"stock check ({a.check_chunks} chunks): mean KLD at {stock_size} bytes: plan {k_plan:.5f} vs "
          f"{mix} {k_stock:.5f} -> {'this plan wins' if winner == 'plan' else 'STOCK WINS'}")
    if winner != "plan":
        res.plan.target["loses_to_stock"] = True
        print(f"warning: this plan loses to the stock {mix} mix of the same size; use --method stock "
              f"--stock-mix {mix}, calibrate (`python -m strategy calibrate`), or inspect the plan", file=sys.stderr)
        return 3
    return 0


def _probe_engine(a, judge: bool = False):
    """A `probe(assignments) -> mean KLD` from verify.probe when installed and a check text is given.

    Round trips use the imatrix (--imatrix) as the converter would, so the probe measures the file we write.
    `judge`: a second session on the --judge-chunks chunks of the check text that follow the probe's."""
    if not getattr(a, "check_text", None) or not a.model:
        return None
    attr = "_judge" if judge else "_probe"
    if getattr(a, attr, None) is not None:  # one session per command and role: loading the model is the slow part
        return getattr(a, attr)
    try:
        from verify.probe import ProbeSession  # the verify engineer's engine
    except ImportError:
        return None
    hessians = None
    if getattr(a, "hessian", None):
        from measure.hessian import load_hessians

        hessians = load_hessians(a.hessian)
    chunks = dict(n_chunks=a.judge_chunks, skip_chunks=a.check_chunks) if judge else dict(n_chunks=a.check_chunks)
    from verify import VerifyError

    try:
        session = ProbeSession(a.model, a.check_text, **chunks,
                               emulate_ggml=bool(getattr(a, "emulate_ggml", False)), hessians=hessians)
    except VerifyError as e:
        raise StrategyError(str(e)) from None
    imp: dict = {}
    if getattr(a, "imatrix", None):
        from measure.imatrix import load_imatrix

        im = load_imatrix(a.imatrix)
        for name, w in session.originals.items():
            v = im.importance_for(name, tuple(w.shape)) if name in im else None
            if v is not None:
                imp[name] = v
    def probe(assign: dict[str, str]) -> float:
        return float(session.probe(assign, importance={n: imp[n] for n in assign if n in imp}).kld_mean)
    setattr(a, attr, probe)
    return probe


def cmd_calibrate(a: argparse.Namespace) -> int:
    from strategy.build import load_measurements, load_metas, metadata_bytes_for
    from strategy.calibrate import fit
    from strategy.problem import build_candidates

    meas = load_measurements(a.db)
    metas = load_metas(a.model, a.metas)
    importance = None
    if a.imatrix:
        from measure.imatrix import load_imatrix
        from strategy.build import imatrix_facts

        if metas is None:
            return _err("--imatrix needs --model (or --metas) to match imatrix entries to tensor shapes")
        importance = imatrix_facts(load_imatrix(a.imatrix), metas).importance
    c = build_candidates(meas, metas, metadata_bytes=metadata_bytes_for(a.model, a.base_gguf, a.metadata_bytes),
                         importance=importance)
    a.check_text = a.text
    a.check_chunks = a.chunks
    probe = _probe_engine(a)
    if probe is None:
        return _err("calibrate needs verify.probe and --model/--text to measure end-to-end KLD; "
                    "install the verify package or pass the model directory and an evaluation text")
    cal = fit(c, probe, n_random=a.random_probes, steps=a.probe_steps, log=print)
    out = Path(a.output) if a.output else _default_calibration(a.db)
    cal.save(out)
    r = cal.report
    print(f"wrote {out}: {r['n_fit']} fit probes, {r['n_heldout']} held out; Spearman(predicted, measured) "
          f"{r['spearman_heldout']:.3f} calibrated vs {r['spearman_heldout_uncalibrated']:.3f} uncalibrated")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from strategy.build import summarize

    plan = load_plan(a.plan)
    validate_plan(plan, list(plan.tensors), source=a.plan)  # type names: a size needs known types
    for line in summarize(plan):
        print(line)
    return 0


def cmd_diff(a: argparse.Namespace) -> int:
    from strategy.build import diff_plans

    for line in diff_plans(load_plan(a.a), load_plan(a.b)):
        print(line)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    plan = load_plan(a.plan)
    if a.model:
        from strategy.build import load_metas

        names = [m.name for m in load_metas(a.model) if m.quantizable]
    else:
        names = list(plan.tensors)
    out = Path(a.tensor_type_file)
    write_atomic(out, "\n".join(tensor_type_file_lines(plan, names)) + "\n")
    print(f"wrote {out}: {len(names)} lines")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m strategy", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build a plan from measurements")
    _add_inputs(b)
    g = b.add_mutually_exclusive_group()
    g.add_argument("--target-size", help="file size budget, e.g. 2.5GiB, 900MiB, 1.2GB")
    g.add_argument("--target-bpw", type=float, help="average bits per weight over all tensors")
    g.add_argument("--knee", action="store_true", help="no budget: each tensor at its error-curve knee")
    b.add_argument("--method", choices=["budget", "knee", "ashq1", "stock"])
    b.add_argument("--stock-mix", help="for --method stock: Q4_K_M, Q3_K_M, ... (default: largest that fits)")
    b.add_argument("--knee-tolerance", type=float, default=2.0)
    b.add_argument("--calibration", help="calibration JSON (default: calibration.json next to --db, if present)")
    b.add_argument("--uncalibrated", action="store_true", help="ignore calibration.json next to the db")
    b.add_argument("--constraints", help="YAML with floors, ceilings, pins, no_imatrix, allowed_types")
    b.add_argument("--floor", action="append", metavar="CLASS=TYPE")
    b.add_argument("--ceiling", action="append", metavar="CLASS=TYPE")
    b.add_argument("--pin", action="append", metavar="TENSOR=TYPE")
    b.add_argument("--no-imatrix", action="append", metavar="TENSOR", help="tensor without imatrix coverage")
    b.add_argument("--imatrix", help="imatrix (GGUF or .dat): coverage limits, ASHQ1 importance and tied groups")
    b.add_argument("--check-text", help="evaluation text for the end-to-end check against stock")
    b.add_argument("--check-chunks", type=int, default=4)
    b.add_argument("--hessian", help="input covariances the converter will use (--hessian): probes round-trip "
                                     "with the error-compensated encoding")
    b.add_argument("--emulate-ggml", action="store_true",
                   help="the check's probes round activations as llama.cpp's CPU matmul does (about 2x slower)")
    b.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="with --check-text: rounds of probe-judged refinement of the chosen plan (one probe per tensor "
                        "group and factor; kept only when the measured KLD drops). Each of its 35-40 steps is judged "
                        "on the --check-chunks probe chunks, so on few chunks it can fit their noise: on SmolLM2 a "
                        "refinement on 2 chunks lost 5%% on unseen text (docs/quality.md), hence --judge-chunks")
    b.add_argument("--judge-chunks", type=int, default=8, metavar="N",
                   help="with --refine: when the refinement changed the plan, measure it and the unrefined plan on the "
                        "N chunks of --check-text after the probe chunks and keep the lower (default 8; 0: keep the "
                        "refined plan unjudged)")
    b.add_argument("--no-select", action="store_true",
                   help="with --check-text and a calibration, the plan of each of its proxies and the stock-like mix "
                        "are probed and the lowest KLD is written; this keeps the calibration's own choice without "
                        "probing")
    b.add_argument("-o", "--output", required=True)
    b.set_defaults(fn=cmd_build)

    c = sub.add_parser("calibrate", help="fit proxy -> KLD scales from end-to-end probes")
    _add_inputs(c)
    c.add_argument("--text", required=False, help="evaluation text for the probes")
    c.add_argument("--chunks", type=int, default=4)
    c.add_argument("--imatrix", help="imatrix (GGUF or .dat) the converter will use: probes round-trip with it")
    c.add_argument("--hessian", help="input covariances the converter will use (--hessian): probes round-trip "
                                     "with the error-compensated encoding")
    c.add_argument("--random-probes", type=int, default=8)
    c.add_argument("--probe-steps", choices=("sparse", "all"), default="sparse",
                   help="sparse: each group probed at two ladder steps (extrapolated to the others); all: at every "
                        "lossy step (about twice the probes; what benchmarks/bench_quality.py uses)")
    c.add_argument("--emulate-ggml", action="store_true",
                   help="probes round activations as llama.cpp's CPU matmul does (Q8_K / Q8_0 per weight type): "
                        "about 2x slower, and the measured cost then includes it (matters at 5-8 bpw)")
    c.add_argument("-o", "--output")
    c.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("show", help="summary of a plan: size, bpw, histogram by class and layer")
    s.add_argument("plan")
    s.set_defaults(fn=cmd_show)

    d = sub.add_parser("diff", help="tensors whose type differs between two plans")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(fn=cmd_diff)

    e = sub.add_parser("export", help="llama-quantize --tensor-type-file from a plan")
    e.add_argument("plan")
    e.add_argument("--tensor-type-file", required=True)
    e.add_argument("--model", help="model dir: one line per quantizable tensor (default: the plan's tensors)")
    e.set_defaults(fn=cmd_export)

    a = ap.parse_args(argv)
    try:
        if getattr(a, "hessian", None):  # a bad covariance file fails now, not after the plan is solved
            from measure.hessian import load_hessians

            load_hessians(a.hessian)
        return a.fn(a)
    except OSError as e:
        return _err(os_error_line(e))
    except (StrategyError, PlanError, SizeError, ValueError) as e:
        return _err(str(e))


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly, as Unix tools do
    sys.exit(main())
