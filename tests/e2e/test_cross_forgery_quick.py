"""The cross-forgery benchmark v2's mechanics (``--quick``): every row runs, resumes, and is reported.

This checks the machinery only (a few faces, one fold, one seed, three steps); the numbers mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cross_forgery.py"


@pytest.mark.slow
def test_quick_benchmark_runs_every_method_and_reports(tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, str(SCRIPT), "table", "--quick", "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    sys.path.insert(0, str(SCRIPT.parent))
    import cross_forgery

    summary = json.loads((results / "dinov2-s14" / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == set(cross_forgery.METHODS)
    for name, row in rows.items():
        assert 0.0 <= row["heldout_mean"] <= 1.0 and 0.0 <= row["in_domain"] <= 1.0, name
        if name != "masm":
            low, point, high = row["paired"][1], row["paired"][0], row["paired"][2]
            assert low <= point <= high, name
    # The adapters train what they should: a probe nothing of the backbone, full fine-tuning all of it.
    assert rows["linear-probe"]["trainable_backbone"] == 0
    assert rows["full-ft"]["trainable_backbone"] > 50 * rows["lora-r8"]["trainable_backbone"]
    assert rows["ln-tuning"]["trainable_backbone"] < rows["lora-r8"]["trainable_backbone"]
    for plot in ("per_family_auc.png", "paired_vs_masm.png", "table.md"):
        assert (results / "dinov2-s14" / plot).stat().st_size > 0

    # Each run is one file holding its per-image test scores (the paired statistics need them).
    run = json.loads(next((results / "dinov2-s14" / "table").glob("masm__*.json")).read_text())
    assert len(run["test_scores"]) == len(run["test_labels"]) == len(run["test_family"]) > 0
    assert set(run["test_family"]) - {"real"} <= set(cross_forgery.mechanism_groups()[run["fold"]])

    # Finished runs are not run again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " s0 lr " not in again.stdout  # nothing trained the second time
