"""The accelerator run of ``benchmarks/speed.py``: one prepared command for a GPU (``--device cuda``).

    .venv/bin/python benchmarks/speed.py --device cuda --dtype bfloat16 --preset gpu   # ViT-L/14, 224 px, batch 32
    .venv/bin/python benchmarks/speed.py --device cpu --preset tiny                    # the same code path, tiny

Per method (MASM with the regularisers on, PEFT LoRA at matched rank, PEFT OSF): injection time
(``get_peft_model``, MASM's SVD included), training-step time under autocast (interleaved, synchronised),
peak accelerator memory of training, and unmerged / merged inference time against the frozen base.
Every time is a median over interleaved repetitions; every ratio is a median of paired ratios.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

PRESETS: dict[str, dict[str, Any]] = {
    # What the issue asks for: ViT-L/14 at 224 px, batch 32; ~3-4 min on one modern GPU.
    "gpu": {"model": "vit-l14", "batch": 32, "warmup": 3, "steps": 10, "infer_reps": 10},
    # The code path on a CPU (make test): a tiny tower, a few steps.
    "tiny": {"model": "tiny-a", "batch": 2, "warmup": 1, "steps": 2, "infer_reps": 2},
}
DEVICE_METHODS = ("lora_r8", "masm_reg", "osf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_device_suite(
    speed: Any,
    device_name: str,
    dtype_name: str | None,
    preset: str,
    methods: tuple[str, ...] = DEVICE_METHODS,
) -> dict[str, Any]:
    """Measure ``methods`` on ``device_name``; ``speed`` is the ``benchmarks/speed.py`` module (models, configs)."""
    settings = PRESETS[preset]
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    model_name, batch_size = settings["model"], settings["batch"]
    base = speed.build_base(model_name).to(device)
    pixels, labels = (t.to(device) for t in speed.make_batch(model_name, batch_size))
    result: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast_dtype": dtype_name,
        "preset": preset,
        **settings,
        "methods": {},
    }
    steps: dict[str, Callable[[], float]] = {}
    models: dict[str, nn.Module] = {}
    for method in methods:
        _sync(device)
        started = time.perf_counter()
        model = speed.inject(speed.shared_copy(base), method).to(device)
        _sync(device)
        inject_s = time.perf_counter() - started
        trainer = speed.Trainer(model, method, (pixels, labels))
        autocast = _autocast(device, dtype)

        def step(trainer=trainer, autocast=autocast) -> float:
            _sync(device)
            start = time.perf_counter()
            with autocast:
                trainer.training_step(trainer.batch)
            _sync(device)
            return time.perf_counter() - start

        _reset_peak(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        for _ in range(settings["warmup"]):
            step()
        peak = _peak_memory(device)
        result["methods"][method] = {
            "trainable": speed.param_counts(model),
            "inject_s": inject_s,
            "peak_train_memory_bytes": peak,
            "train_memory_increment_bytes": None if peak is None or before is None else peak - before,
        }
        steps[method] = step
        models[method] = model
    speed.log(f"device suite {model_name} on {device}: timing {list(steps)}")
    step_times = speed.interleave(steps, 0, settings["steps"])
    result["step_times"] = step_times
    result["step_ratio_vs_lora"] = {
        m: speed.paired_ratio(t, step_times["lora_r8"]) for m, t in step_times.items()
    }

    forwards: dict[str, nn.Module] = {"base": base}
    for method, model in models.items():
        model.eval()
        forwards[f"{method}_unmerged"] = model
    forwards["masm_reg_merged"] = copy.deepcopy(models["masm_reg"]).merge_and_unload()

    def forward(model: nn.Module) -> Callable[[], float]:
        def run() -> float:
            with torch.inference_mode(), _autocast(device, dtype):
                _sync(device)
                start = time.perf_counter()
                model(pixel_values=pixels)
                _sync(device)
                return time.perf_counter() - start

        return run

    infer = speed.interleave({name: forward(m) for name, m in forwards.items()}, 1, settings["infer_reps"])
    result["inference_times"] = infer
    result["inference_ratio_vs_base"] = {n: speed.paired_ratio(t, infer["base"]) for n, t in infer.items()}
    result["step_median_s"] = {m: statistics.median(t) for m, t in step_times.items()}
    return result
