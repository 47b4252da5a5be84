"""Where a MASM training step's time goes beside LoRA's and OSF's, on the ViT-B/16 shape of ``speed.py``.

Four parts, each timed in one process (medians; the model forward + backward interleaved across methods, as
``speed.py`` does, so load hits every method alike):

* model forward + backward (cross-entropy, batch 1), per method and as a ratio to LoRA's;
* one AdamW step over each method's trainable tensors, with torch's default CPU implementation and ``foreach``;
* MASM's fit-bound projection (``project_fit_bound``, what the step hook runs after every optimizer step);
* MASM's regularisers (``regularization_terms()`` forward + backward, the step hook's call), and the share of it
  spent in the products with the frozen weights (``aten::mm``, from ``torch.profiler``);
* the ops the host dispatches per part (aten ops counted by ``torch.profiler``: what a host-bound GPU step pays
  per op), and the inference cache check of one MASM layer (``delta_factors`` under ``inference_mode``).

Run: ``.venv/bin/python benchmarks/step_breakdown.py`` (about two minutes, 1 thread), or with
``--model narrow-l14 --batch 2`` for the host-bound stand-in of ``speed.py --device cpu --preset host``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the models and configs of the speed benchmark)

METHODS = ("lora_r8", "masm", "masm_reg", "osf")


def median_ms(fn: Callable[[], object], reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def aten_ops(fn: Callable[[], object]) -> int:
    """How many aten ops one call of ``fn`` dispatches."""
    with torch.profiler.profile() as profile:
        fn()
    return sum(e.count for e in profile.key_averages() if e.key.startswith("aten::"))


def forward_backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], float]:
    pixels, labels = batch

    def run() -> float:
        start = time.perf_counter()
        nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-b16", choices=sorted(speed.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = speed.build_base(args.model)
    batch = speed.make_batch(args.model, args.batch)
    models = {m: speed.inject(speed.shared_copy(base), m) for m in METHODS}
    for model in models.values():
        model.train()
    print(f"{args.model}, batch {args.batch}, 1 thread, load average {os.getloadavg()[0]:.1f}")

    times = speed.interleave({m: forward_backward(models[m], batch) for m in METHODS}, 2, 12)
    for m in METHODS:
        ratio = speed.paired_ratio(times[m], times["lora_r8"])
        print(
            f"forward+backward {m:>9}: {statistics.median(times[m]) * 1e3:6.1f} ms, / LoRA {speed.fmt_ratio(ratio)}"
        )

    for m in METHODS:
        params = [p for p in models[m].parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        cells = []
        for foreach in (False, True):
            optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
            cells.append(f"{'foreach' if foreach else 'default'} {median_ms(optimizer.step):5.1f} ms")
        cells.append(f"{aten_ops(optimizer.step)} ops")
        print(f"AdamW step {m:>9} ({len(params)} tensors): {', '.join(cells)}")
        models[m].zero_grad(set_to_none=True)
        ops = aten_ops(forward_backward(models[m], batch))
        print(f"  forward+backward ops {m:>9}: {ops}")

    masm = models["masm_reg"].base_model
    print(
        f"fit-bound projection: {median_ms(masm.project_fit_bound):.1f} ms, {aten_ops(masm.project_fit_bound)} ops"
    )
    _, layer = next(masm.masm_layers())
    with torch.inference_mode():
        check_us = median_ms(lambda: layer.delta_factors("default"), reps=2000) * 1e3
    print(f"inference cache check of one layer (delta_factors, cached): {check_us:.1f} us")

    def regularisers() -> None:
        masm.regularization_terms()["total"].backward()
        masm.zero_grad(set_to_none=True)

    print(f"regularisers forward+backward: {median_ms(regularisers):.1f} ms")
    with torch.profiler.profile() as profile:
        for _ in range(3):
            regularisers()
    events = {e.key: e for e in profile.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values())
    mm = events["aten::mm"]
    print(
        f"  of which aten::mm (the products with the frozen weights): {mm.self_cpu_time_total / total:.0%}, "
        f"{mm.count // 3} calls per step, {mm.self_cpu_time_total / mm.count / 1e3:.2f} ms each"
    )


if __name__ == "__main__":
    main()
