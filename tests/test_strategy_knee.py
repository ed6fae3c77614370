"""Knee allocator: obvious knees on crafted curves, importance raises, constraints honoured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from measure.records import Measurement  # noqa: E402
from strategy.constraints import Constraints  # noqa: E402
from strategy.knee import allocate_knee, knee_index, pareto_order  # noqa: E402
from strategy.problem import build_candidates  # noqa: E402
from strategy.sizes import bits_per_weight  # noqa: E402

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def _meas(name, errs, n_params=65536, cls="attn_q", layer=0):
    out = []
    for t, e in zip(TYPES, errs):
        b = bits_per_weight(t)
        out.append(Measurement(name, t, n_params, int(n_params * b / 8), b, e ** 0.5, e, e, e, 1 - e, cls, layer))
    return out


def test_knee_on_crafted_curves():
    b = np.array([bits_per_weight(t) for t in TYPES])
    # a cliff below Q4_K, flat above: the knee is Q4_K
    assert TYPES[knee_index(b, np.array([1.0, 0.9, 0.05, 0.04, 0.035, 0.03]))] == "Q4_K"
    # a cliff right after Q2_K: the knee is Q3_K
    assert TYPES[knee_index(b, np.array([1.0, 0.06, 0.05, 0.04, 0.03, 0.02]))] == "Q3_K"
    # only the last step helps: the knee is at the end
    assert TYPES[knee_index(b, np.array([1.0, 1.0 - 1e-3, 1.0 - 2e-3, 1.0 - 3e-3, 1.0 - 4e-3, 0.0]))] == "Q8_0"


def test_pareto_drops_dominated_types():
    b = np.array([2.0, 3.0, 4.0, 4.5])
    e = np.array([1.0, 1.2, 0.5, 0.6])
    assert list(pareto_order(b, e)) == [0, 2]


def test_allocate_knee_importance_raises_sensitive_tensor():
    curve = [1.0, 0.9, 0.05, 0.04, 0.035, 0.03]
    meas = []
    for i in range(5):
        meas += _meas(f"blk.{i}.attn_q.weight", curve, layer=i)
    meas += _meas("blk.9.attn_q.weight", [x * 100 for x in [1.0, 0.9, 0.05, 0.02, 0.0009, 0.0001]], layer=9)
    c = build_candidates(meas)
    choice, notes = allocate_knee(c, tolerance=2.0)
    types = c.types_of(choice)
    for i in range(5):
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K"
        assert notes[f"blk.{i}.attn_q.weight"] == {"knee": "Q4_K", "raised": False}
    # 100x more loss at its knee: raised until its loss is within 2x the median knee loss
    assert notes["blk.9.attn_q.weight"]["knee"] == "Q4_K"
    assert types["blk.9.attn_q.weight"] == "Q6_K"


def test_knee_respects_constraints():
    meas, metas = synth_model(n_layers=3, seed=1)
    cons = Constraints(floors={"ffn_down": "Q6_K"}, ceilings={"attn_q": "Q3_K"}, pins={"blk.1.attn_k.weight": "Q8_0"})
    c = build_candidates(meas, metas, constraints=cons)
    choice, _ = allocate_knee(c)
    types = c.types_of(choice)
    assert cons.satisfied_by(c, types) == []
    assert all(bits_per_weight(types[f"blk.{i}.ffn_down.weight"]) >= 6.5 for i in range(3))
    assert types["blk.1.attn_k.weight"] == "Q8_0"


def test_knee_svg_matches_docs_example():
    import xml.dom.minidom

    from strategy.knee import knee_svg

    svg = knee_svg(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"], [1e-2, 3.1e-3, 8e-4, 2.1e-4, 6e-5, 1e-5],
                   chosen="Q5_K")
    xml.dom.minidom.parseString(svg)
    assert "knee: Q4_K" in svg and "raised: Q5_K" in svg
    docs = Path(__file__).resolve().parent.parent / "docs" / "knee.svg"
    assert docs.read_text() == svg  # the committed plot is what the code draws
