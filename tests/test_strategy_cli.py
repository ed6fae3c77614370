"""python -m strategy: build (each method), show, diff, export, plan round trip, one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from strategy_synth import synth_model  # noqa: E402

from strategy.plan import load_plan, save_plan  # noqa: E402
from strategy.sizes import file_size, strategy_kv_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "strategy", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("strategy-cli")
    meas, metas = synth_model(n_layers=6, hidden=512, ffn=1024, seed=9)
    (d / "m.json").write_text(json.dumps([m.to_dict() for m in meas]))
    (d / "metas.json").write_text(json.dumps([m.to_dict() for m in metas]))
    return d, meas, metas


@pytest.mark.parametrize("method", ["budget", "ashq1", "stock"])
def test_build_exact_size_and_round_trip(inputs, method):
    d, meas, metas = inputs
    out = d / f"{method}.yaml"
    p = run("build", "--db", d / "m.json", "--metas", d / "metas.json", "--metadata-bytes", 12345,
            "--target-size", "6MiB", "--method", method, "-o", out)
    assert f"wrote {out}" in p.stdout
    plan = load_plan(out)
    types = {m.name: plan.type_for(m.name) for m in metas if m.quantizable}
    types.update({m.name: m.fixed_type for m in metas if not m.quantizable})
    size = file_size(metas, types, 12345 + strategy_kv_bytes(out.name))
    assert size == plan.target["size"] <= 6 * 1024**2
    if method == "budget":
        assert size >= 0.99 * 6 * 1024**2
        assert "stock check" in p.stdout and "NOT checked end to end" in p.stdout
    # load -> save -> load gives the same plan (JSON too)
    for ext in ("yaml", "json"):
        again = d / f"again-{method}.{ext}"
        save_plan(plan, again)
        assert load_plan(again).to_dict() == plan.to_dict()


def test_knee_show_diff_export(inputs):
    d, _, metas = inputs
    run("build", "--db", d / "m.json", "--metas", d / "metas.json", "--knee", "-o", d / "knee.yaml")
    run("build", "--db", d / "m.json", "--metas", d / "metas.json", "--target-bpw", "4.5", "-o", d / "b.yaml")
    plan = load_plan(d / "b.yaml")
    assert 4.3 <= plan.target["bpw"] <= 4.5
    show = run("show", d / "knee.yaml").stdout
    assert "method: knee" in show and "ffn_down" in show and "layer" in show
    diff = run("diff", d / "knee.yaml", d / "b.yaml").stdout
    assert "tensor(s) differ" in diff
    run("export", d / "b.yaml", "--tensor-type-file", d / "types.txt")
    lines = (d / "types.txt").read_text().splitlines()
    assert len(lines) == sum(m.quantizable for m in metas)
    assert lines[0].startswith("^token_embd\\.weight$=")


def test_user_errors_are_one_line(inputs):
    d, _, _ = inputs
    for args, needle in [
        (("build", "--db", d / "missing.db", "--target-size", "1GiB", "-o", d / "x.yaml"), "not found"),
        (("build", "--db", d / "m.json", "--target-size", "lots", "-o", d / "x.yaml"), "cannot read size"),
        (("build", "--db", d / "m.json", "--metas", d / "metas.json", "--target-size", "10KiB", "-o", d / "x.yaml"),
         "below the smallest"),
        (("build", "--db", d / "m.json", "--metas", d / "metas.json", "--target-size", "5MiB", "--floor",
          "ffn_down=Q9_Z", "-o", d / "x.yaml"), "unknown type"),
        (("build", "--db", d / "m.json", "-o", d / "x.yaml"), "needs --target-size"),
        (("show", d / "nope.yaml"), "cannot read"),
        (("build", "--db", d / "m.json", "--metas", d / "metas.json", "--target-bpw", "4.5", "--hessian",
          d / "nope.safetensors", "-o", d / "x.yaml"), "covariance file not found"),
        (("calibrate", "--db", d / "m.json", "--hessian", d / "m.json"), "not a readable covariance file"),
    ]:
        p = run(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert needle in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_hand_edit_errors_name_the_line(inputs, tmp_path):
    """A typo in a hand-edited plan: the error points at the line to fix (show, and validation against a model)."""
    from strategy.plan import PlanError, validate_plan

    d, _, metas = inputs
    run("build", "--db", d / "m.json", "--metas", d / "metas.json", "--target-bpw", "4.5", "-o", tmp_path / "p.yaml")
    lines = (tmp_path / "p.yaml").read_text().splitlines()
    names = [m.name for m in metas if m.quantizable]
    at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(names[3] + ":"))
    bad_type = lines.copy()
    bad_type[at] = bad_type[at].replace("type: ", "type: Q9", 1)
    (tmp_path / "t.yaml").write_text("\n".join(bad_type) + "\n")
    p = run("show", tmp_path / "t.yaml", check=False)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {tmp_path / 't.yaml'}:{at + 1}: tensor {names[3]}:"), p.stderr
    assert "unknown type" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    bad_name = lines.copy()
    bad_name[at] = bad_name[at].replace(names[3], names[3].replace("blk.", "blk.9"), 1)
    (tmp_path / "n.json").write_text(json.dumps(load_plan_yaml_dict(bad_name), indent=2))  # the typo in JSON
    (tmp_path / "n.yaml").write_text("\n".join(bad_name) + "\n")
    with pytest.raises(PlanError, match=rf"n\.yaml:{at + 1}: 1 tensor\(s\) not in the model"):
        validate_plan(load_plan(tmp_path / "n.yaml"), names, source=str(tmp_path / "n.yaml"))
    with pytest.raises(PlanError, match=r"n\.json:\d+: 1 tensor\(s\) not in the model"):
        validate_plan(load_plan(tmp_path / "n.json"), names, source=str(tmp_path / "n.json"))


def load_plan_yaml_dict(lines: list[str]) -> dict:
    import yaml

    return yaml.safe_load("\n".join(lines))
