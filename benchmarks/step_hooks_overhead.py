"""What the step hooks cost: MASM trained through ``optimizer.step()``'s hooks against the explicit path.

    .venv/bin/python benchmarks/step_hooks_overhead.py            # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/step_hooks_overhead.py --quick    # tiny models, seconds

Each method's step (``peft_masm.TrainingStep``, AdamW) is timed interleaved with the others in one process, on
ViT-B/16 at batch 1 and 8 and on the host-bound stand-in of a GPU step (``narrow-l14``: ViT-L/14's 24 blocks at
width 64, see ``harness.py``). ``masm`` / ``masm_reg`` use the step hooks (the default), ``*_explicit`` the same
config with ``step_hooks=False`` (``recipes/methods/*_explicit.yaml``) (the loop adds the regularisers to the loss and calls the mask and the fit
bound). Writes ``benchmarks/results/step_hooks_overhead.json``: per setting the median seconds of each method and
the paired ratios hooks / explicit and method / LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

METHODS = ["lora_r8", "masm", "masm_explicit", "masm_reg", "masm_reg_explicit"]
PAIRS = [
    ("masm", "masm_explicit"),
    ("masm_reg", "masm_reg_explicit"),
    ("masm", "lora_r8"),
    ("masm_reg", "lora_r8"),
]


def measure(model: str, batch: int, steps: int) -> dict:
    trained = harness.time_training(model, METHODS, batch, warmup=2, steps=steps)
    times = trained["times"]
    return {
        "model": model,
        "batch": batch,
        "steps": steps,
        "median_s": {m: harness.summary(t)["median"] for m, t in times.items()},
        "ratios": {f"{a} / {b}": harness.paired_ratio(times[a], times[b]) for a, b in PAIRS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out", type=Path, default=harness.ROOT / "benchmarks" / "results" / "step_hooks_overhead.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    import peft_masm  # noqa: F401

    settings = (
        [("tiny-a", 1, 3)] if args.quick else [("vit-b16", 1, 12), ("vit-b16", 8, 6), ("narrow-l14", 2, 40)]
    )
    results = {"machine": harness.machine_facts(), "settings": []}
    for model, batch, steps in settings:
        results["settings"].append(measure(model, batch, steps))
        results["machine"]["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["settings"][-1]["ratios"], indent=1), flush=True)


if __name__ == "__main__":
    main()
