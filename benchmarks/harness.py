"""What the speed benchmarks share: the models, a method's injection, the timed training step, interleaving and
the statistics of paired ratios (``speed.py``, ``device_suite.py``, ``step_hooks_overhead.py``,
``step_breakdown.py``). Methods come from the registry (``peft_masm.recipe.methods``, ``recipes/methods/``)."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_masm.recipe import methods as method_registry
from peft_masm.recipe.methods import is_masm

__all__ = [
    "MODELS",
    "ROOT",
    "Trainer",
    "build_base",
    "fmt_ratio",
    "inject",
    "interleave",
    "is_masm",
    "log",
    "loss_and_steps",
    "machine_facts",
    "make_batch",
    "masm_total_rank",
    "method_config",
    "paired_ratio",
    "param_counts",
    "shared_copy",
    "summary",
    "time_training",
]

ROOT = Path(__file__).resolve().parents[1]
HEAD = ["classifier"]  # the 2-way head of CLIPForImageClassification, trained by every method

# CLIP vision towers (transformers CLIPVisionConfig sizes).
MODELS: dict[str, dict[str, int]] = {
    "vit-b16": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=224,
    ),
    "vit-l14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    ),
    # for the layer-mask overhead (issue 3)
    "clip-small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        patch_size=16,
        image_size=112,
    ),
    # ViT-L/14's 24 blocks at width 64 (16 patches): per step the same ops as ViT-L/14, each of them tiny, so the
    # step is bound by op dispatch on the host, as a ViT-L/14 step at batch 32 is on an H200 (device_suite.py)
    "narrow-l14": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=24,
        num_attention_heads=4,
        patch_size=14,
        image_size=56,
    ),
    # --quick stand-ins
    "tiny-a": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=16,
        image_size=64,
    ),
    "tiny-b": dict(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        patch_size=16,
        image_size=64,
    ),
}


# ------------------------------------------------------------------------------------------- models
def build_base(model_name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised CLIP vision classifier (2 labels); the same seed gives the same weights."""
    from transformers import CLIPConfig, CLIPForImageClassification

    torch.manual_seed(seed)
    config = CLIPConfig(vision_config=MODELS[model_name], num_labels=2)
    return CLIPForImageClassification(config).eval()


def masm_total_rank() -> int:
    import peft_masm

    return peft_masm.MASMConfig().total_rank


def method_config(method: str, hidden: int = 768) -> Any:
    """The PEFT config of registry method ``method`` on the CLIP towers (None for the frozen base with a trainable
    head); ``hidden``: the width."""
    import peft_masm

    targets = peft_masm.default_target_modules("clip")
    return method_registry.method_config(method, hidden, targets, head=HEAD)


def inject(base: nn.Module, method: str) -> nn.Module:
    """Wrap ``base`` with ``method``'s adapter (for 'base': freeze all but the head)."""
    config = method_config(method, base.config.vision_config.hidden_size)
    if config is None:
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
        return base
    from peft import get_peft_model

    model = get_peft_model(base, config)
    for name, p in model.named_parameters():  # OSF ignores modules_to_save: every method trains the head
        if "classifier" in name and "original_module" not in name and p.is_floating_point():
            p.requires_grad_(True)
    method_registry.finish_injection(method, model)  # AdaMSS: the allocator's target, once its total is known
    return model


def param_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: adapter (everything but the head) and head."""
    adapter = head = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "classifier" in name:
            head += p.numel()
        else:
            adapter += p.numel()
    return {"adapter": adapter, "head": head}


class Trainer:
    """One model + its AdamW + the step as a training loop runs it."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        batch: tuple[torch.Tensor, torch.Tensor],
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """``autocast_dtype``: run the forward pass under ``torch.autocast`` (as accelerate's mixed precision does:
        backward, optimizer step, regularisers and fit bound stay outside it)."""
        self.model, self.method, self.batch = model, method, batch
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        # The library's training step (the one recipes/train.py runs): loss + regularisers, backward,
        # non-finite check, layer mask, optimizer.
        from peft_masm.training import TrainingStep

        self.training_step = TrainingStep(
            model,
            self.optimizer,
            functools.partial(_cross_entropy, autocast_dtype=autocast_dtype),
            # AdaMSS's adaptive subspace allocation runs after every optimizer step
            after_optimizer_step=method_registry.after_optimizer_step(model),
        )
        # Lazy regularisation is timed over whole cycles (N steps, one of them regularised): its amortised step.
        config = getattr(model, "peft_config", {}).get("default")
        self.cycle = getattr(config, "regularization_interval", 1)

    def step(self) -> float:
        """Seconds per optimizer step (the mean over one regularisation cycle)."""
        start = time.perf_counter()
        for _ in range(self.cycle):
            self.training_step(self.batch)
        return (time.perf_counter() - start) / self.cycle


def _cross_entropy(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    pixels, labels = batch
    autocast = torch.autocast(pixels.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with autocast:
        logits = model(pixel_values=pixels).logits
    return nn.functional.cross_entropy(logits.float(), labels)


def make_batch(model_name: str, batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = MODELS[model_name]["image_size"]
    return torch.randn(batch_size, 3, size, size, generator=g), torch.randint(
        0, 2, (batch_size,), generator=g
    )


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` that shares its frozen backbone tensors (the head is copied)."""
    memo = {id(p): p for name, p in base.named_parameters() if not name.startswith("classifier")}
    return copy.deepcopy(base, memo)


# ------------------------------------------------------------------------------------ statistics
def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


def paired_ratio(a: list[float], b: list[float]) -> dict[str, float]:
    ratios = [x / y for x, y in zip(a, b)]
    out = summary(ratios)
    out["ratio_of_medians"] = statistics.median(a) / statistics.median(b)
    return out


def interleave(fns: dict[str, Callable[[], float]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Call each function in turn, rotating the start each round; drop the first ``warmup`` rounds."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t = fns[n]()
            if r >= warmup:
                times[n].append(t)
    return times


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def machine_facts() -> dict[str, Any]:
    import peft
    import transformers

    load = os.getloadavg()
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load,
        "gpu": torch.cuda.is_available(),
    }


def loss_and_steps(
    model: nn.Module,
    method: str,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    sync: Callable[[], None] = lambda: None,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[], float], Callable[[], float]]:
    """The training computation ``loss_of(x, y)`` (forward under autocast when ``autocast_dtype`` is given, loss)
    and two timed steps over ``batch`` built on it, eager and with ``torch.compile(loss_of)``; backward and AdamW
    stay eager in both. MASM's regularisers and fit bound run where the method's training loop runs them: inside
    ``optimizer.step()``'s hooks (eager) with ``step_hooks`` on, the default; for an explicit method
    (``step_hooks=False``) the regularisers are added to the loss (compiled with it) and the step applies the fit
    bound. ``sync`` runs before the clock starts and stops (an accelerator's synchronisation)."""
    pixels, labels = batch
    tuner = getattr(model, "base_model", None)
    explicit = is_masm(method) and not model.peft_config["default"].step_hooks
    regularised = explicit and model.peft_config["default"].orthogonality_weight > 0

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = _cross_entropy(model, (x, y), autocast_dtype)
        return loss + tuner.regularization_loss()["total"] if regularised else loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def timed(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        def step() -> float:
            sync()
            start = time.perf_counter()
            fn(pixels, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if explicit:
                tuner.apply_fit_bound()
            sync()
            return time.perf_counter() - start

        return step

    return loss_of, timed(loss_of), timed(torch.compile(loss_of))


def time_training(
    model_name: str, methods: list[str], batch_size: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Each method's training step on one shared base, interleaved: ``times`` per method (seconds per step),
    and the ``trainers``, ``base`` and ``batch`` for what follows (inference, decomposition)."""
    base = build_base(model_name)
    batch = make_batch(model_name, batch_size)
    trainers = {m: Trainer(inject(shared_copy(base), m), m, batch) for m in methods}
    log(f"training {model_name}: {methods}, batch {batch_size}, {warmup} warm-up + {steps} steps")
    times = interleave({m: t.step for m, t in trainers.items()}, warmup, steps) if steps else {}
    return {"times": times, "trainers": trainers, "base": base, "batch": batch}
