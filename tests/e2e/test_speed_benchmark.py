"""The speed benchmark's code paths on CPU (mechanics only, never its numbers): the accelerator suite that a GPU
run uses (``--device cpu --preset tiny``) and the torch.compile section's graph-break count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def _finite(values) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_device_suite_runs_on_cpu_and_writes_every_figure(tmp_path):
    out = tmp_path / "device.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--preset",
        "tiny",
        "--compile",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    suite = json.loads(out.read_text())
    methods = {"lora_r8", "masm", "masm_reg", "masm_reg_lazy4", "osf", "adamss"}
    assert suite["errors"] == {} and set(suite["methods"]) == methods
    for method, facts in suite["methods"].items():
        assert facts["inject_s"] >= 0 and facts["trainable"]["adapter"] > 0, method
        assert _finite(suite["step_times"][method])
    assert suite["methods"]["masm_reg_lazy4"]["regularization_cycle"] == 4
    assert set(suite["inference_times"]) == {"base", "masm_reg_merged", "lora_r8_merged"} | {
        f"{m}_unmerged" for m in methods
    }
    assert all(_finite(times) for times in suite["inference_times"].values())
    assert set(suite["profile"]) == {"lora_r8", "masm", "masm_reg", "osf"}
    assert all(p["wall_ms"] > 0 and p["host_ops"] > 0 and p["top_ops"] for p in suite["profile"].values())
    assert set(suite["compile"]["compiled_vs_eager"]) == {"lora_r8", "masm_reg"}
    assert _finite(suite["compile"]["steps"]["masm_reg_compiled"])


def test_device_suite_refuses_a_missing_accelerator_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the refusal cannot be observed")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--preset", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert "no CUDA device is visible" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_masm_training_computation_compiles_without_graph_breaks():
    """Issue 12: the regularised MASM forward + loss traces into one graph (no break inside MASM code); with the
    step hooks (the default) the regularisers run in ``optimizer.step()``, on the explicit path
    (``masm_reg_explicit``) they are in the loss and traced with it."""
    sys.path.insert(0, str(SCRIPT.parent))
    import speed

    facts = speed.compile_check("tiny-a", ["masm_reg", "masm_reg_explicit"], 2, warmup=0, steps=1)
    for method in ("masm_reg", "masm_reg_explicit"):
        masm = facts["methods"][method]
        assert masm["graph_breaks_in_masm_code"] == 0, masm["break_reasons"]
        assert masm["graph_breaks"] == 0 and masm["graphs"] == 1, masm["break_reasons"]
        assert _finite(facts["times"][f"{method}_compiled"]) and _finite(facts["times"][f"{method}_eager"])
