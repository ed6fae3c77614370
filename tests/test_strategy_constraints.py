"""Constraints: every allocator honours floors, ceilings, pins, imatrix coverage and row fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from strategy.ashq1 import allocate_ashq1  # noqa: E402
from strategy.budget import allocate  # noqa: E402
from strategy.constraints import Constraints  # noqa: E402
from strategy.knee import allocate_knee  # noqa: E402
from strategy.problem import StrategyError, build_candidates  # noqa: E402
from strategy.sizes import TensorMeta, bits_per_weight  # noqa: E402

CONS = Constraints(floors={"ffn_down": "Q5_K", "re:^blk\\.0\\.": "Q4_K"}, ceilings={"ffn_up": "Q4_K"},
                   pins={"blk.2.attn_v.weight": "Q8_0"}, no_imatrix={"blk.3.ffn_gate.weight"})


@pytest.mark.parametrize("method", ["budget", "ashq1", "knee"])
@pytest.mark.parametrize("frac", [0.15, 0.5])
def test_allocators_honour_constraints(method, frac):
    meas, metas = synth_model(n_layers=4, seed=2)
    c = build_candidates(meas, metas, constraints=CONS)
    budget = int(c.min_bytes() + frac * (c.max_bytes() - c.min_bytes()))
    if method == "budget":
        choice, _ = allocate(c, budget)
    elif method == "ashq1":
        choice = allocate_ashq1(c, budget)
    else:
        choice, _ = allocate_knee(c)
    types = c.types_of(choice)
    assert CONS.satisfied_by(c, types) == []
    assert types["blk.2.attn_v.weight"] == "Q8_0"
    assert types["blk.3.ffn_gate.weight"] != "Q2_K"
    assert all(bits_per_weight(t) >= 4.5 for n, t in types.items() if n.startswith("blk.0."))
    if method != "knee":
        assert c.size_of(choice) <= budget


def test_types_that_do_not_fit_rows_are_excluded():
    meas, metas = synth_model(n_layers=2, seed=3)
    # pretend blk.0.attn_q has rows of 288 values: 256-blocks (K-quants, IQ4_XS) cannot hold them
    metas = [TensorMeta(m.name, (m.shape[0], 288), m.cls, m.layer, m.quantizable, m.fixed_type)
             if m.name == "blk.0.attn_q.weight" else m for m in metas]
    c = build_candidates(meas, metas)
    i = c.index()["blk.0.attn_q.weight"]
    allowed = {t for t, ok in zip(c.types, c.valid[i]) if ok}
    assert allowed == {"Q8_0", "F16"}


def test_contradictions_are_clear_errors():
    meas, metas = synth_model(n_layers=2, seed=3)
    with pytest.raises(StrategyError, match="blk.0.ffn_down.weight: no type satisfies"):
        build_candidates(meas, metas, constraints=Constraints(floors={"ffn_down": "Q8_0"},
                                                                ceilings={"ffn_down": "Q4_K"}))
    with pytest.raises(StrategyError, match="not in the model"):
        build_candidates(meas, metas, constraints=Constraints(pins={"blk.9.nope.weight": "Q4_K"}))


def test_budget_with_floors_below_minimum_is_an_error():
    meas, metas = synth_model(n_layers=2, seed=3)
    c = build_candidates(meas, metas, constraints=Constraints(floors={"ffn_down": "Q8_0"}))
    with pytest.raises(StrategyError, match="relax floors"):
        allocate(c, c.min_bytes() - 1)
