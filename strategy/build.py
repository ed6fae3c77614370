"""From a measurement db to a plan: load inputs, run one allocator, write the evidence into the plan.

Why a module (not just the CLI): the web UI, jobs and benchmarks build plans too, and must get the very same
plans, stats and stock comparisons as `python -m strategy build`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from strategy.plan import Plan, TensorChoice
from strategy.problem import Candidates, StrategyError, build_candidates
from strategy.sizes import TensorMeta, file_size, format_size

METHODS = ("budget", "knee", "ashq1", "stock")


# ------------------------------------------------------------------------------------------------ inputs
def load_measurements(path: str | Path) -> list:
    """Measurement rows from the measure db (measure.db.MeasurementDB) or a JSON/JSONL dump of Measurement dicts."""
    from measure.records import Measurement

    path = Path(path)
    if not path.exists():
        raise StrategyError(f"{path}: measurement db not found; create it with `python -m measure`")
    if path.suffix.lower() in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text) if path.suffix.lower() == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise StrategyError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(rows, dict):
            rows = rows.get("measurements", [])
        return [Measurement(**r) for r in rows]
    try:
        from measure.db import MeasurementDB
    except ImportError:
        raise StrategyError(f"{path}: reading a measurement db needs measure.db (not installed in this checkout); "
                            f"pass a JSON dump instead") from None
    try:
        rows = MeasurementDB(path).measurements()
    except Exception as e:  # the db's own errors are user errors here: one line, no traceback
        raise StrategyError(f"{path}: cannot read measurements ({e})") from None
    if not rows:
        raise StrategyError(f"{path}: the db holds no measurements; run `python -m measure` first")
    return rows


def load_metas(model_dir: str | Path | None, metas_json: str | Path | None = None) -> list[TensorMeta] | None:
    """Every tensor of the converted model (incl. F32 ones) from the catalog, or from a JSON list."""
    if metas_json is not None:
        d = json.loads(Path(metas_json).read_text(encoding="utf-8"))
        return [TensorMeta.from_dict(x) for x in d]
    if model_dir is None:
        return None
    import catalog

    try:
        return [TensorMeta.from_info(i) for i in catalog.list_tensors(model_dir)]
    except catalog.ModelInputError as e:
        raise StrategyError(str(e)) from None


def metadata_bytes_for(model_dir: str | Path | None, gguf: str | Path | None = None,
                       explicit: int | None = None) -> int:
    from strategy.sizes import estimate_metadata_bytes, metadata_bytes_from_gguf

    if explicit is not None:
        return int(explicit)
    if gguf is not None:
        return metadata_bytes_from_gguf(gguf)
    if model_dir is not None:
        return estimate_metadata_bytes(model_dir)
    return 0


# ------------------------------------------------------------------------------------------------ building
@dataclass
class BuildResult:
    plan: Plan
    choice: np.ndarray
    cands: Candidates
    size: int
    predicted_loss: float
    messages: list[str] = field(default_factory=list)


def run_method(c: Candidates, method: str, *, budget: int | None = None, knee_tolerance: float = 2.0,
               stock_mix: str | None = None, metas: Sequence[TensorMeta] | None = None,
               groups: Sequence[Sequence[str]] | None = None, importance: dict | None = None) -> tuple[np.ndarray, dict]:
    """Choice per tensor for one method; `info` carries method-specific evidence for the plan."""
    info: dict = {}
    if method == "knee":
        from strategy.knee import allocate_knee

        choice, notes = allocate_knee(c, knee_tolerance)
        info["per_tensor"] = notes
    elif method == "budget":
        from strategy.budget import allocate

        if budget is None:
            raise StrategyError("--method budget needs --target-size or --target-bpw")
        choice, sol = allocate(c, budget)  # tied groups are ASHQ1's rule; the budget allocator is free
        info["lower_bound"] = sol.lower_bound
    elif method == "ashq1":
        from strategy.ashq1 import allocate_ashq1

        if budget is None:
            raise StrategyError("--method ashq1 needs --target-size or --target-bpw")
        choice = allocate_ashq1(c, budget, importance=importance, groups=groups)
    elif method == "stock":
        choice, mix = stock_choice(c, metas, budget=budget, mix=stock_mix)
        info["mix"] = mix
    else:
        raise StrategyError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return choice, info


def stock_choice(c: Candidates, metas: Sequence[TensorMeta] | None, *, budget: int | None = None,
                 mix: str | None = None) -> tuple[np.ndarray, str]:
    """The stock mix `mix`, or the largest stock mix whose size fits `budget` (its types mapped into c)."""
    from strategy.stock import MIXES, stock_types

    if metas is None:
        raise StrategyError("the stock-like baseline needs the model's tensor list: pass --model DIR")
    candidates = [mix.upper()] if mix else [m for m in MIXES if "_K" in m or m == "Q8_0"]
    results: list[tuple[int, np.ndarray, str]] = []
    for m in candidates:
        types = stock_types(metas, m)
        try:
            ch = c.choice_from_types({n: types[n] for n in c.names})
        except StrategyError:
            if mix:
                raise
            continue
        results.append((c.size_of(ch), ch, m))
    if mix:
        return results[0][1], results[0][2]
    fitting = [r for r in results if budget is None or r[0] <= budget]
    if not fitting:
        raise StrategyError("no stock mix fits the target; raise the target size")
    best = max(fitting, key=lambda r: r[0])
    return best[1], best[2]


def make_plan(c: Candidates, choice: np.ndarray, method: str, target: dict, model: dict | None = None,
              info: dict | None = None) -> Plan:
    """A plan with one explicit entry per tensor we choose (and per unmeasured quantizable tensor)."""
    from strategy.budget import stats_for

    stats = stats_for(c, choice)
    per = (info or {}).get("per_tensor", {})
    idx = c.index()
    tensors = {}
    for name in c.names:
        st = dict(stats[name])
        if name in per and per[name].get("knee"):
            st["knee"] = per[name]["knee"]
        tensors[name] = TensorChoice(type=c.types[int(choice[idx[name]])], stats=st)
    for name in c.unmeasured:
        tensors[name] = TensorChoice(type=c.fixed_types[name], stats={"note": "not measured"})
    counts = Counter(tc.type for tc in tensors.values())
    default = counts.most_common(1)[0][0] if counts else "Q8_0"
    size = c.size_of(choice)
    tgt = dict(target)
    tgt.update({"size": size, "bpw": round(float(c.bpw_of(choice)), 4), "predicted_loss": float(f"{c.loss_of(choice):.6g}")})
    for k in ("lower_bound", "mix"):
        if info and k in info:
            tgt[k] = float(f"{info[k]:.6g}") if isinstance(info[k], float) else info[k]
    return Plan(default_type=default, tensors=tensors, model=dict(model or {}), method=method, target=tgt)


def build(measurements: list, metas: list[TensorMeta] | None, *, method: str, target_size: int | None = None,
          target_bpw: float | None = None, knee_tolerance: float = 2.0, calibration=None, constraints=None,
          metadata_bytes: int = 0, model: dict | None = None, stock_mix: str | None = None,
          importance: dict | None = None, groups: Sequence[Sequence[str]] | None = None,
          plan_file_name: str | None = None,
          log: Callable[[str], None] = lambda s: None) -> BuildResult:
    """Build one plan. `metadata_bytes` is the model's kv section; the kv entries the converter adds for the
    plan itself (digest, file name) are added here, so the converted file is exactly `size` bytes."""
    from strategy.budget import budget_from_bpw
    from strategy.sizes import strategy_kv_bytes

    if metas is not None:
        metadata_bytes = int(metadata_bytes) + strategy_kv_bytes(plan_file_name)

    c = build_candidates(measurements, metas, metadata_bytes=metadata_bytes, calibration=calibration,
                         constraints=constraints, importance=importance)
    budget = target_size
    target: dict = {}
    if target_size is not None:
        target["bytes"] = int(target_size)
    if target_bpw is not None:
        budget = budget_from_bpw(c, target_bpw)
        target.update({"bpw_target": target_bpw, "bytes": budget})
    if metas is None and target_size is not None:
        log("note: no --model given, so sizes count only the measured tensors (no F32 tensors, no metadata)")
    choice, info = run_method(c, method, budget=budget, knee_tolerance=knee_tolerance, stock_mix=stock_mix,
                              metas=metas, importance=importance, groups=groups)
    if constraints is not None and method != "stock":
        bad = constraints.satisfied_by(c, c.types_of(choice))
        if bad:
            raise StrategyError(f"internal: plan breaks constraints: {bad[:3]}")
    plan = make_plan(c, choice, method, target, model, info)
    if calibration is not None:
        plan.target["calibrated"] = True
    if metas is not None:
        types = dict(c.fixed_types)
        types.update(c.types_of(choice))
        assert file_size(metas, types, metadata_bytes) == c.size_of(choice)
    res = BuildResult(plan, choice, c, c.size_of(choice), c.loss_of(choice))
    res.messages.extend(c.notes[:20])
    return res


# ------------------------------------------------------------------------------------------------ reports
def summarize(plan: Plan) -> list[str]:
    """Lines for `show`: size, bpw, type histogram by class and by layer."""
    out = []
    t = plan.target or {}
    out.append(f"method: {plan.method or '?'}   default type: {plan.default_type}   tensors: {len(plan.tensors)}")
    if "size" in t:
        out.append(f"file size: {t['size']} bytes ({format_size(int(t['size']))})   bpw: {t.get('bpw', '?')}"
                   + (f"   target: {t['bytes']} bytes" if "bytes" in t else ""))
    if "predicted_loss" in t:
        out.append(f"predicted loss: {t['predicted_loss']}" + ("  (calibrated)" if t.get("calibrated") else "")
                   + (f"   lower bound: {t['lower_bound']}" if "lower_bound" in t else ""))
    types = sorted({c.type for c in plan.tensors.values()}, key=_type_order)
    from strategy.names import layer_of, tensor_class

    by_cls: dict[str, Counter] = {}
    by_layer: dict[str, Counter] = {}
    for name, ch in plan.tensors.items():
        by_cls.setdefault(tensor_class(name), Counter())[ch.type] += 1
        layer = layer_of(name)
        by_layer.setdefault("-" if layer is None else str(layer), Counter())[ch.type] += 1
    for title, table in (("class", by_cls), ("layer", by_layer)):
        out.append("")
        out.append(f"{title:16s}" + "".join(f"{x:>7s}" for x in types))
        keys = sorted(table, key=lambda k: (0, int(k)) if k.isdigit() else (-1, k))
        for k in keys:
            out.append(f"{k:16s}" + "".join(f"{table[k].get(x, 0) or '.':>7}" for x in types))
    if plan.rules:
        out.append("")
        out.append("rules: " + ", ".join(f"{r.pattern}={r.type}" for r in plan.rules))
    return out


def _type_order(t: str) -> tuple[float, str]:
    from strategy.sizes import bits_per_weight

    try:
        return (bits_per_weight(t), t)
    except ValueError:
        return (99.0, t)


def diff_plans(a: Plan, b: Plan, names: Sequence[str] | None = None) -> list[str]:
    names = list(names) if names is not None else sorted(set(a.tensors) | set(b.tensors))
    out = []
    for n in names:
        ta, tb = a.type_for(n), b.type_for(n)
        if ta.upper() != tb.upper():
            out.append(f"{n:40s} {ta:>6s} -> {tb}")
    sa, sb = (a.target or {}).get("size"), (b.target or {}).get("size")
    out.append(f"{len(out)} tensor(s) differ" + (f"; size {sa} -> {sb} bytes ({(sb - sa):+d})" if sa and sb else ""))
    return out


# ------------------------------------------------------------------------------------------------ imatrix
@dataclass
class ImatrixFacts:
    no_imatrix: set[str]                 # quantizable tensors the imatrix does not (fully) cover
    importance: dict[str, float]         # mean importance per tensor (ASHQ1's weighting)
    groups: list[list[str]]              # tensors with identical importance rows (same input activations)


def imatrix_facts(imatrix, metas: Sequence[TensorMeta]) -> ImatrixFacts:
    """What the allocators need from a `measure.imatrix.Imatrix`: coverage, importance and tied groups.

    Tied groups are found from the data, not from names: tensors whose importance vectors are byte-identical
    read the same activations (attn_q/k/v after one norm, ffn_gate/up), so ASHQ1 moves them together.
    """
    import hashlib

    no_imatrix: set[str] = set()
    importance: dict[str, float] = {}
    by_hash: dict[tuple[int | None, str], list[str]] = {}
    for m in metas:
        if not m.quantizable:
            continue
        cov = imatrix.coverage(m.name)
        try:
            imp = imatrix.importance_for(m.name, m.shape)
        except ValueError:
            imp = None
        if imp is None or cov is None or cov.empty or cov.partial:
            no_imatrix.add(m.name)
        if imp is None:
            continue
        importance[m.name] = float(np.mean(imp))
        key = (m.layer, hashlib.sha1(np.ascontiguousarray(imp, dtype=np.float32).tobytes()).hexdigest())
        by_hash.setdefault(key, []).append(m.name)
    return ImatrixFacts(no_imatrix, importance, [g for g in by_hash.values() if len(g) > 1])
