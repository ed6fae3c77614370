"""The strategy file: which GGUF type each tensor gets, in a form a person can read, edit and diff.

One schema, two encodings (YAML or JSON, chosen by file extension):

    format: gguf-strategy/1
    model: {name: SmolLM2-135M, fingerprint: "sha256:..."}
    default_type: Q4_K          # tensors matched by neither `tensors` nor `rules`
    method: budget              # informational: how it was built, and with what
    target: {bytes: 94371840}
    rules:                      # ordered regexes (re.search), first match wins, as llama-quantize's --tensor-type
      - {pattern: 'ffn_down', type: Q5_K}
    tensors:                    # explicit entries win over rules; the numbers are the evidence, not inputs
      blk.0.attn_q.weight: {type: Q4_K, bpw: 4.5, error: 1.2e-4}
      blk.0.attn_k.weight: Q6_K # a bare type is fine when hand-editing

Resolution order per tensor: explicit entry > first matching rule > default_type.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from outputs import write_atomic

FORMAT = "gguf-strategy/1"


class PlanError(ValueError):
    """A strategy file that cannot be used as it is; the message names the file, the line and the fix."""


@dataclass
class TensorChoice:
    type: str
    stats: dict[str, Any] = field(default_factory=dict)  # bpw, bytes, error... the numbers behind the choice


@dataclass
class Rule:
    pattern: str
    type: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass
class Plan:
    default_type: str = "Q8_0"
    tensors: dict[str, TensorChoice] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    target: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys survive a round trip
    # key -> line in the file it was loaded from, so validation errors point at the line to edit
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, source: str, key: str) -> str:
        """`source:LINE` of `key` when the plan was loaded from a file, else `source`."""
        return f"{source}:{self.lines[key]}" if key in self.lines else source

    def type_for(self, name: str) -> str:
        """The type this plan assigns to tensor `name` (before shape fallbacks, which the converter applies)."""
        if name in self.tensors:
            return self.tensors[name].type
        for rule in self.rules:
            if rule.matches(name):
                return rule.type
        return self.default_type

    def explicit_type(self, name: str) -> str | None:
        """Type from an entry or a rule, or None when only the default applies."""
        if name in self.tensors:
            return self.tensors[name].type
        return next((r.type for r in self.rules if r.matches(name)), None)

    def digest(self) -> str:
        """sha256 of the canonical JSON of what decides types (not the evidence numbers)."""
        canon = {
            "default_type": self.default_type.upper(),
            "rules": [[r.pattern, r.type.upper()] for r in self.rules],
            "tensors": {k: v.type.upper() for k, v in sorted(self.tensors.items())},
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT}
        if self.model:
            d["model"] = dict(self.model)
        d["default_type"] = self.default_type
        if self.method:
            d["method"] = self.method
        if self.target:
            d["target"] = dict(self.target)
        d.update(self.extra)
        if self.rules:
            d["rules"] = [{"pattern": r.pattern, "type": r.type} for r in self.rules]
        d["tensors"] = {
            name: ({"type": c.type, **c.stats} if c.stats else c.type) for name, c in self.tensors.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<plan>",
                  lines: Mapping[str, int] | None = None) -> Plan:
        lines = lines or {}

        def where(key: str) -> str:
            return f"{source}:{lines[key]}" if key in lines else source

        if not isinstance(d, Mapping):
            raise PlanError(f"{source}: expected a mapping at the top level (see strategy/plan.py for the schema)")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise PlanError(f"{source}: unsupported format {fmt!r}; expected {FORMAT!r}")
        tensors: dict[str, TensorChoice] = {}
        for name, entry in (d.get("tensors") or {}).items():
            if isinstance(entry, str):
                tensors[str(name)] = TensorChoice(type=entry)
            elif isinstance(entry, Mapping) and isinstance(entry.get("type"), str):
                stats = {k: v for k, v in entry.items() if k != "type"}
                tensors[str(name)] = TensorChoice(type=entry["type"], stats=stats)
            else:
                raise PlanError(f"{where(str(name))}: tensor {name!r} needs a type, e.g. `{name}: Q4_K`")
        rules: list[Rule] = []
        for i, r in enumerate(d.get("rules") or []):
            if not (isinstance(r, Mapping) and isinstance(r.get("pattern"), str) and isinstance(r.get("type"), str)):
                raise PlanError(f"{source}: rule #{i + 1} needs `pattern` and `type`, e.g. {{pattern: ffn_down, type: Q5_K}}")
            try:
                re.compile(r["pattern"])
            except re.error as e:
                raise PlanError(f"{source}: rule #{i + 1} pattern {r['pattern']!r} is not a valid regex: {e}") from None
            rules.append(Rule(pattern=r["pattern"], type=r["type"]))
        known = {"format", "model", "default_type", "method", "target", "rules", "tensors"}
        return cls(
            default_type=str(d.get("default_type", "Q8_0")),
            tensors=tensors,
            rules=rules,
            model=dict(d.get("model") or {}),
            method=d.get("method"),
            target=dict(d.get("target") or {}),
            extra={k: v for k, v in d.items() if k not in known},
            lines=dict(lines),
        )


def _yaml_tensor_lines(text: str) -> dict[str, int]:
    """Line numbers of top-level-ish keys, so validation errors can point at the line to edit."""
    out: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"\s*['\"]?([A-Za-z0-9_.\-]+)['\"]?\s*:", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = i
    return out


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"{path}: cannot read strategy file ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else (f":{e.lineno}" if hasattr(e, "lineno") else "")
        raise PlanError(f"{path}{line}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                        f"{getattr(e, 'problem', None) or e}") from None
    return Plan.from_dict(data or {}, source=str(path), lines=_yaml_tensor_lines(text))


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write YAML or JSON (by extension) via a temp file + rename, so a crash never leaves half a plan."""
    path = Path(path)
    d = plan.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(d, indent=2) + "\n"
    else:
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120)
    write_atomic(path, text)


def validate_plan(plan: Plan, tensor_names: Iterable[str], source: str = "<plan>",
                  valid_types: Iterable[str] | None = None) -> None:
    """Every named tensor exists in the model and every type name is known; errors list close matches."""
    names = list(tensor_names)
    known = set(names)
    missing = [n for n in plan.tensors if n not in known]
    if missing:
        hints = []
        for n in missing[:10]:
            close = difflib.get_close_matches(n, names, n=2)
            hints.append(f"{n}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise PlanError(f"{plan.where(source, missing[0])}: {len(missing)} tensor(s) not in the model: "
                        f"{'; '.join(hints)}{more}")
    if valid_types is None:
        from quants import WRITABLE_TYPES
        valid_types = [t.name for t in WRITABLE_TYPES]
    valid = {t.upper() for t in valid_types}
    for key, label, t in [("default_type", "default_type", plan.default_type)] \
            + [("rules", f"rule {r.pattern!r}", r.type) for r in plan.rules] \
            + [(n, f"tensor {n}", c.type) for n, c in plan.tensors.items()]:
        if t.upper() not in valid:
            raise PlanError(f"{plan.where(source, key)}: {label}: unknown type {t!r}; valid types: "
                            f"{', '.join(sorted(valid))}")


def tensor_type_file_lines(plan: Plan, tensor_names: Iterable[str]) -> list[str]:
    """llama-quantize `--tensor-type-file` lines (`regex=type`), one anchored pattern per tensor.

    llama-quantize lower-cases the pattern and uses regex_search with first match winning, so exact, anchored
    names reproduce this plan tensor for tensor (it still applies its own shape fallbacks, as our converter does).
    """
    out = []
    for name in tensor_names:
        out.append(f"^{re.escape(name)}$={plan.type_for(name).lower()}")
    return out
