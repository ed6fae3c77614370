"""The README's third command: the whole pipeline on a generated tiny model must keep working."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.reference
def test_quickstart_runs_the_whole_pipeline(reference, tmp_path):
    # outputs of an older run (another version's model) in the same directory must not stop a rerun
    (tmp_path / "measure.sqlite").write_bytes(b"not the db of this model")
    (tmp_path / "plan.yaml").write_text("stale: plan\n")
    res = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "model-plan.gguf").stat().st_size > 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    labels = json.dumps(results)
    for expected in ("model-plan", "Q8_0", "Q4_K_M"):
        assert expected in labels
    assert (tmp_path / "report" / "chart.png").stat().st_size > 1000
