"""Constraints every allocator respects: class floors and ceilings, pinned tensors, imatrix coverage, row fit.

Why a separate step: allocators only ever see the candidate table, so masking a (tensor, type) cell here
makes every method (budget, knee, ashq1) honour the constraint without knowing about it.

Floors and ceilings compare types by bits per weight (Q4_K floor admits Q4_K, IQ4_NL, Q4_0, Q5_K, ...) and
are keyed by tensor class (`ffn_down`) or a regex on the name (`re:blk\\.(0|1)\\.`). Tensors the imatrix did
not cover (e.g. never-activated experts) are limited to types that are safe without one: llama.cpp refuses the
IQ1/IQ2 types without an imatrix and treats Q2_K as imatrix-only in Q2_K_S, so the minimum there is Q3_K.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from strategy.problem import Candidates, StrategyError
from strategy.sizes import bits_per_weight, fits_row, padded_bytes

# Types ggml can write without an importance matrix and that hold up without one (see module docstring).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "Q2_K"})


def safe_without_imatrix(qtype: str) -> bool:
    return qtype.upper() not in NEEDS_IMATRIX


@dataclass
class Constraints:
    floors: dict[str, str] = field(default_factory=dict)     # class or "re:<regex>" -> lowest allowed type
    ceilings: dict[str, str] = field(default_factory=dict)   # class or "re:<regex>" -> highest allowed type
    pins: dict[str, str] = field(default_factory=dict)       # tensor name -> exact type
    no_imatrix: set[str] = field(default_factory=set)        # tensors without imatrix coverage
    allowed_types: set[str] | None = None                    # restrict the whole plan to these types

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "<constraints>") -> Constraints:
        known = {"floors", "ceilings", "pins", "no_imatrix", "allowed_types"}
        extra = set(d) - known
        if extra:
            raise StrategyError(f"{source}: unknown key(s) {sorted(extra)}; valid: {sorted(known)}")
        return cls(floors={str(k): str(v).upper() for k, v in (d.get("floors") or {}).items()},
                   ceilings={str(k): str(v).upper() for k, v in (d.get("ceilings") or {}).items()},
                   pins={str(k): str(v).upper() for k, v in (d.get("pins") or {}).items()},
                   no_imatrix=set(d.get("no_imatrix") or []),
                   allowed_types={str(t).upper() for t in d["allowed_types"]} if d.get("allowed_types") else None)

    @staticmethod
    def _matches(key: str, name: str, cls: str) -> bool:
        if key.startswith("re:"):
            return re.search(key[3:], name) is not None
        return key == cls or key == name

    def apply(self, c: Candidates, metas: Mapping | None = None) -> None:
        """Mask cells of `c` that break a constraint; raise when a tensor is left with no type."""
        metas = metas or {}
        bpw = np.array([bits_per_weight(t) for t in c.types])
        unknown_pins = [n for n in self.pins if n not in c.names and n not in c.fixed_types]
        if unknown_pins:
            raise StrategyError(f"pinned tensor {unknown_pins[0]!r} is not in the model; check the name "
                                f"(e.g. blk.0.attn_v.weight)")
        for table, label in ((self.floors, "floor"), (self.ceilings, "ceiling")):
            for key, t in table.items():
                bits_per_weight(t)  # raises on an unknown type
                if key.startswith("re:"):
                    try:
                        re.compile(key[3:])
                    except re.error as e:
                        raise StrategyError(f"{label} pattern {key!r} is not a valid regex: {e}") from None
        for i, name in enumerate(c.names):
            cls = c.classes[i]
            before = c.valid[i].copy()
            why = []
            for key, t in self.floors.items():
                if self._matches(key, name, cls):
                    c.valid[i] &= bpw >= bits_per_weight(t) - 1e-9
                    why.append(f"floor {key}={t}")
            for key, t in self.ceilings.items():
                if self._matches(key, name, cls):
                    c.valid[i] &= bpw <= bits_per_weight(t) + 1e-9
                    why.append(f"ceiling {key}={t}")
            if self.allowed_types is not None:
                c.valid[i] &= np.array([t in self.allowed_types for t in c.types])
                why.append("allowed types")
            if name in self.no_imatrix:
                c.valid[i] &= np.array([safe_without_imatrix(t) for t in c.types])
                why.append("no imatrix coverage")
            meta = metas.get(name)
            if meta is not None:
                c.valid[i] &= np.array([fits_row(t, meta.n_per_row) for t in c.types])
            if name in self.pins:
                t = self.pins[name]
                if t not in c.types:
                    if meta is None:
                        raise StrategyError(f"pin {name}={t}: {t} was not measured for this tensor; measure it "
                                            f"or pin a measured type ({', '.join(c.types)})")
                    # a pinned type need not be measured: its bytes are exact, its loss is irrelevant
                    _add_type(c, t)
                    bpw = np.array([bits_per_weight(x) for x in c.types])
                    before = np.append(before, False)
                j = c.types.index(t)
                if meta is not None and not fits_row(t, meta.n_per_row):
                    raise StrategyError(f"pin {name}={t}: rows of {meta.n_per_row} do not fit {t} blocks; "
                                        f"pin a type whose block size divides {meta.n_per_row}")
                keep = np.zeros(len(c.types), dtype=bool)
                keep[j] = True
                if not np.isfinite(c.err[i, j]):
                    if meta is None:
                        raise StrategyError(f"pin {name}={t}: {t} was not measured for this tensor")
                    c.nbytes[i, j] = padded_bytes(t, meta.shape)
                    c.err[i, j] = 0.0
                c.valid[i] = keep
                why = [f"pinned to {t}"]
            if not c.valid[i].any():
                had = [t for t, ok in zip(c.types, before) if ok]
                raise StrategyError(f"tensor {name}: no type satisfies {', '.join(why) or 'the row length'} "
                                    f"(measured: {', '.join(had) or 'none'}); relax the constraint or measure "
                                    f"more types")
            c.loss[i] = np.where(c.valid[i], np.where(np.isfinite(c.loss[i]), c.loss[i], 0.0), np.inf)
        for name, t in self.pins.items():
            if name in c.fixed_types and c.fixed_types[name] != t:
                raise StrategyError(f"pin {name}={t}: this tensor is not quantized by llama.cpp "
                                    f"(kept at {c.fixed_types[name]}); remove the pin")

    def satisfied_by(self, c: Candidates, types: Mapping[str, str]) -> list[str]:
        """Violations of these constraints by a finished assignment (empty when all hold)."""
        out = []
        cls_of = dict(zip(c.names, c.classes))
        for name, t in types.items():
            cls = cls_of.get(name, "")
            b = bits_per_weight(t)
            for key, f in self.floors.items():
                if self._matches(key, name, cls) and b < bits_per_weight(f) - 1e-9:
                    out.append(f"{name}: {t} below floor {f}")
            for key, f in self.ceilings.items():
                if self._matches(key, name, cls) and b > bits_per_weight(f) + 1e-9:
                    out.append(f"{name}: {t} above ceiling {f}")
            if name in self.pins and self.pins[name] != t.upper():
                out.append(f"{name}: {t} but pinned to {self.pins[name]}")
            if name in self.no_imatrix and not safe_without_imatrix(t):
                out.append(f"{name}: {t} needs an imatrix")
        return out


def _add_type(c: Candidates, t: str) -> None:
    """Append a column for a type nobody measured (only pins use it), keeping the table consistent."""
    c.types.append(t)
    n = c.n
    c.nbytes = np.concatenate([c.nbytes, np.zeros((n, 1), dtype=np.int64)], axis=1)
    c.err = np.concatenate([c.err, np.full((n, 1), np.nan)], axis=1)
    c.loss = np.concatenate([c.loss, np.full((n, 1), np.inf)], axis=1)
    c.valid = np.concatenate([c.valid, np.zeros((n, 1), dtype=bool)], axis=1)


def parse_type_map(items: Iterable[str], what: str) -> dict[str, str]:
    """CLI `key=TYPE` items -> dict; one-line error naming the bad item."""
    out = {}
    for it in items:
        if "=" not in it:
            raise StrategyError(f"--{what} {it!r}: write KEY=TYPE, e.g. ffn_down=Q4_K")
        k, v = it.split("=", 1)
        try:
            bits_per_weight(v)
        except ValueError:
            raise StrategyError(f"--{what} {it!r}: unknown type {v!r}") from None
        out[k.strip()] = v.strip().upper()
    return out
