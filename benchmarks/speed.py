"""Speed and memory of MASM against PEFT LoRA and the frozen base model, as ratios from ONE run.

Run (the table in BENCHMARKS.md, "Speed and memory")::

    .venv/bin/python benchmarks/speed.py                # writes benchmarks/results/speed.json (~10 min)
    .venv/bin/python benchmarks/speed.py --quick        # smoke run on tiny models (speed_quick.json)

What it measures, all on randomly initialised CLIP vision towers with a 2-way linear head
(``CLIPForImageClassification``), CPU float32:

* **Training step time**: one optimizer step = forward, cross-entropy, (MASM with non-zero weights:
  ``+ regularization_loss()["total"]``), backward, (MASM: ``update_layer_mask()``), AdamW step,
  ``zero_grad``. All methods of one model live in one process (sharing the frozen base weights) and are
  **interleaved step by step** (A B C A B C ...), so a load spike on the shared machine hits every method
  alike. Reported: median step time per method and, per target pair, the median of the paired per-step
  ratios with its inter-quartile range (IQR: the noise). ``masm_reg_lazy4`` (lazy regularisation,
  ``regularization_interval=4``) is timed over whole 4-step cycles, so its figure is the amortised step.
* **Inference time**: ``inference_mode`` forward of the base model, the unmerged adapters and the merged
  ones (``merge_and_unload``), interleaved the same way.
* **Peak memory**: each method runs in a fresh subprocess. After the model is built and the adapter
  injected, the kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` <- 5) and two training
  steps run; ``VmHWM`` is then the peak resident memory of training (weights + activations + gradients +
  optimizer state). Reported both as the absolute peak and as the increment over the RSS before the steps.
* **Injection time** (``get_peft_model``, which runs MASM's SVD) and **load time**
  (``PeftModel.from_pretrained`` of the saved adapter onto a freshly built base, no SVD), measured in the
  same fresh subprocesses; **adapter file size** (``adapter_model.safetensors``).
* **Decomposition**: MASM's minor-spectrum decomposition of the 96 attention projections of ViT-L/14
  against a plain per-layer ``torch.linalg.svd`` (same run), and the exactness of the stored starting
  factors ``U0 diag(s0) V0^T`` against a float64 full SVD on a few layers.
* **Layer-mask overhead**: MASM with ``layer_mask="dynamic"`` against ``"none"`` on a small CLIP,
  interleaved, over enough steps to include mask decisions.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

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

EFFORT_PUBLISHED_PARAMS = (
    0.19e6  # Effort (Yan et al., ICML 2025), CLIP ViT-L/14, rank-1 residual on q/k/v/out
)
EFFORT_PUBLISHED_CHECKPOINT_BYTES = 2e9  # "~2 GB" full-model checkpoints released by Effort


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
    """The PEFT config of a method (None for the frozen base with a trainable head); ``hidden``: the width."""
    from peft import LoraConfig

    import peft_masm

    targets = peft_masm.default_target_modules("clip")
    if method == "base":
        return None
    if method.startswith("lora_r"):
        rank = int(method.removeprefix("lora_r"))
        return LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, modules_to_save=["classifier"]
        )
    common: dict[str, Any] = {"target_modules": targets, "modules_to_save": ["classifier"]}
    if method == "masm_reg":  # defaults, dynamic mask, regularisers on
        return peft_masm.MASMConfig(
            orthogonality_weight=0.1, spectral_weight=0.1, layer_mask="dynamic", **common
        )
    if (
        method == "masm_reg_lazy4"
    ):  # masm_reg with lazy regularisation: the terms at every 4th step, weighted 4x
        return peft_masm.MASMConfig(
            orthogonality_weight=0.1,
            spectral_weight=0.1,
            layer_mask="dynamic",
            regularization_interval=4,
            **common,
        )
    if method == "masm":  # all MASMConfig defaults (regulariser weights 0)
        return peft_masm.MASMConfig(**common)
    if method.endswith("_explicit"):  # the same method trained by the explicit path (step_hooks=False)
        config = method_config(method.removesuffix("_explicit"), hidden)
        config.step_hooks = False
        return config
    if method == "masm_dynamic":  # defaults with the dynamic layer mask (for its overhead)
        return peft_masm.MASMConfig(layer_mask="dynamic", **common)
    if method == "masm_nomask":
        return peft_masm.MASMConfig(layer_mask="none", **common)
    if method == "effort":
        from peft_masm.presets import masm_config

        return masm_config("effort", **common)
    # PEFT's orthogonal-subspace method, training the K*k smallest directions as MASM does
    if method == "osf":
        from peft import OSFConfig

        return OSFConfig(effective_rank=hidden - masm_total_rank(), target_modules=targets)
    if method == "adamss":  # PEFT's multi-subspace SVD, K=4 x k=2 as MASM, with its adaptive allocator
        from peft import AdamssConfig

        return AdamssConfig(
            r=32,
            num_subspaces=4,
            subspace_rank=2,
            use_asa=True,
            target_modules=targets,
            modules_to_save=["classifier"],
        )
    raise ValueError(f"unknown method {method!r}")


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
    # AdaMSS's allocator keeps 75 % of the subspaces, as MASM's mask keeps 75 % of the layers
    if method == "adamss":
        config.asa_target_subspaces = max(1, round(0.75 * model.base_model._get_asa_total_subspaces()))
    return model


def is_masm(method: str) -> bool:
    return method.startswith("masm") or method == "effort"


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

        after_step = None
        if method == "adamss":  # AdaMSS's adaptive subspace allocation runs after every optimizer step

            def after_step(step: int) -> None:
                model.base_model.update_and_allocate(step)

        self.training_step = TrainingStep(
            model,
            self.optimizer,
            functools.partial(_cross_entropy, autocast_dtype=autocast_dtype),
            after_optimizer_step=after_step,
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


# ------------------------------------------------------------------------- subprocess: memory etc.
def _proc_status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh-process figures of one method: injection, peak training memory, adapter size, load time."""
    torch.set_num_threads(spec["threads"])
    from peft import PeftModel

    import peft_masm  # noqa: F401  (registers MASM with PEFT)

    model_name, method = spec["model"], spec["method"]
    base = build_base(model_name)
    batch = make_batch(model_name, spec["batch_size"])
    out: dict[str, Any] = {"model": model_name, "method": method}
    start = time.perf_counter()
    model = inject(base, method)
    out["inject_s"] = time.perf_counter() - start
    out["trainable"] = param_counts(model)
    trainer = Trainer(model, method, batch)
    rss_before = _proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(spec["mem_steps"]):
        trainer.step()
    out["rss_before_steps"] = rss_before
    out["peak_rss"] = _proc_status("VmHWM")
    out["peak_increment"] = out["peak_rss"] - rss_before
    if method != "base":
        model.eval()
        with torch.inference_mode():
            reference = model(pixel_values=batch[0]).logits
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            out["adapter_bytes"] = (Path(folder) / "adapter_model.safetensors").stat().st_size
            fresh = build_base(model_name)
            start = time.perf_counter()
            loaded = PeftModel.from_pretrained(fresh, folder)
            out["load_s"] = time.perf_counter() - start
            with torch.inference_mode():
                out["load_max_abs_diff"] = float(
                    (loaded(pixel_values=batch[0]).logits - reference).abs().max()
                )
    return out


def run_workers(models: list[tuple[str, list[str], int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fresh-process measurements, methods interleaved (A B C A B C) over ``--mem-repeats`` rounds."""
    results = []
    for model_name, methods, batch_size in models:
        for rep in range(args.mem_repeats):
            order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
            for method in order:
                spec = {
                    "model": model_name,
                    "method": method,
                    "batch_size": batch_size,
                    "mem_steps": 2,
                    "threads": args.threads,
                }
                log(f"worker {model_name} {method} (round {rep + 1})")
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-4000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["round"] = rep
                results.append(row)
    return results


# ------------------------------------------------------------------------------ in-process timing
def time_training(
    model_name: str, methods: list[str], batch_size: int, warmup: int, steps: int
) -> dict[str, Any]:
    base = build_base(model_name)
    batch = make_batch(model_name, batch_size)
    trainers = {m: Trainer(inject(shared_copy(base), m), m, batch) for m in methods}
    log(f"training {model_name}: {methods}, batch {batch_size}, {warmup} warm-up + {steps} steps")
    times = interleave({m: t.step for m, t in trainers.items()}, warmup, steps) if steps else {}
    return {"times": times, "trainers": trainers, "base": base, "batch": batch}


def time_inference(
    model_name: str, trained: dict[str, Any], methods: list[str], merged: list[str], warmup: int, reps: int
) -> dict:
    pixels = trained["batch"][0]
    models: dict[str, nn.Module] = {"base": trained["base"]}
    for m in methods:
        models[f"{m}_unmerged"] = trained["trainers"][m].model
    for m in merged:
        models[f"{m}_merged"] = copy.deepcopy(trained["trainers"][m].model).merge_and_unload()
    for model in models.values():
        model.eval()

    def forward(model: nn.Module) -> Callable[[], float]:
        def run() -> float:
            with torch.inference_mode():
                start = time.perf_counter()
                model(pixel_values=pixels)
                return time.perf_counter() - start

        return run

    # merged outputs equal unmerged ones (sanity: the merge is what was timed)
    with torch.inference_mode():
        merge_err = {
            m: float(
                (
                    models[f"{m}_merged"](pixel_values=pixels).logits
                    - models[f"{m}_unmerged"](pixel_values=pixels).logits
                )
                .abs()
                .max()
            )
            for m in merged
        }
    log(f"inference {model_name}: {list(models)}, {warmup} warm-up + {reps} reps")
    times = interleave({n: forward(m) for n, m in models.items()}, warmup, reps)
    return {"times": times, "merge_max_abs_diff": merge_err}


def loss_and_steps(
    model: nn.Module,
    method: str,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    sync: Callable[[], None] = lambda: None,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[], float], Callable[[], float]]:
    """The training computation ``loss_of(x, y)`` (forward under autocast when ``autocast_dtype`` is given, loss,
    MASM's regularisers when weighted) and two timed steps over ``batch`` built on it, eager and with
    ``torch.compile(loss_of)``: backward, AdamW and MASM's fit-bound projection stay eager in both. ``sync``
    runs before the clock starts and stops (an accelerator's synchronisation)."""
    pixels, labels = batch
    tuner = getattr(model, "base_model", None)
    masm = is_masm(method)
    regularised = masm and model.peft_config["default"].orthogonality_weight > 0

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
            if masm:
                tuner.apply_fit_bound()
            sync()
            return time.perf_counter() - start

        return step

    return loss_of, timed(loss_of), timed(torch.compile(loss_of))


def compile_check(
    model_name: str, methods: list[str], batch_size: int, warmup: int, steps: int
) -> dict[str, Any]:
    """``torch.compile`` of the training computation (forward, loss, MASM's regularisers): graph breaks from
    ``torch._dynamo.explain`` and the compiled / eager step ratio, interleaved, per method (``loss_and_steps``)."""
    base = build_base(model_name)
    batch = make_batch(model_name, batch_size)
    out: dict[str, Any] = {"model": model_name, "batch_size": batch_size, "steps": steps, "methods": {}}
    fns: dict[str, Callable[[], float]] = {}
    for method in methods:
        model = inject(shared_copy(base), method)
        model.train()
        loss_of, eager, compiled = loss_and_steps(model, method, batch)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(loss_of)(*batch)
        reasons = [
            f"{r.reason.splitlines()[0][:120]} ({r.user_stack[-1].filename.rsplit('/', 1)[-1]}:{r.user_stack[-1].lineno})"
            if r.user_stack
            else r.reason.splitlines()[0][:120]
            for r in explained.break_reasons
        ]
        in_masm_layer = sum("layer.py" in reason or "regularizers.py" in reason for reason in reasons)
        log(f"compile {model_name} {method}: first compiled call (compilation)")
        started = time.perf_counter()
        compiled()
        out["methods"][method] = {
            "graphs": explained.graph_count,
            "graph_breaks": explained.graph_break_count,
            "graph_breaks_in_masm_code": in_masm_layer,
            "break_reasons": reasons[:5],
            "compile_s": time.perf_counter() - started,
        }
        fns[f"{method}_eager"] = eager
        fns[f"{method}_compiled"] = compiled
    log(f"compile {model_name}: timing {list(fns)}, {warmup} warm-up + {steps} steps")
    out["times"] = interleave(fns, warmup, steps)
    return out


def decomposition_check(
    model_name: str, trainers: dict[str, Trainer], args: argparse.Namespace
) -> dict[str, Any]:
    """MASM's batched minor-spectrum decomposition vs a per-layer torch.linalg.svd; exactness vs float64."""
    import numpy as np

    from peft_masm.tuner.decomposition import minor_triplets_many

    base = trainers[next(iter(trainers))].model.get_base_model()
    weights = [
        m.weight
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and re.search(r"self_attn\.(q|k|v|out)_proj(\.base_layer)?$", name)
    ]
    out: dict[str, Any] = {"num_matrices": len(weights), "shape": list(weights[0].shape)}
    log(f"decomposition of {len(weights)} matrices {tuple(weights[0].shape)}")
    runs: dict[str, list[float]] = {"masm_minor_triplets_many": [], "torch_linalg_svd_per_layer": []}
    for _ in range(args.svd_repeats):
        start = time.perf_counter()
        minor_triplets_many(weights, [1] * len(weights))
        runs["masm_minor_triplets_many"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for w in weights:
            torch.linalg.svd(w.detach(), full_matrices=False)
        runs["torch_linalg_svd_per_layer"].append(time.perf_counter() - start)
    out["times_s"] = runs
    # exactness of what the adapters store, against a float64 full SVD
    exact: dict[str, Any] = {}
    for method, trainer in trainers.items():
        if not is_masm(method):
            continue
        rows = []
        layers = list(trainer.model.base_model.masm_layers("default"))
        for name, layer in layers[: args.exact_layers]:
            w = layer.get_base_layer().weight.detach().double().numpy()
            u, s, vt = np.linalg.svd(w)
            total = layer.masm_num_subspaces["default"] * layer.masm_subspace_rank["default"]
            d = s.shape[0]
            tail = (u[:, d - total :] * s[d - total :]) @ vt[d - total :]
            U0 = layer.masm_U0["default"].double().numpy()
            s0 = layer.masm_s0["default"].double().numpy()
            V0 = layer.masm_V0["default"].double().numpy()
            ours = (U0 * s0) @ V0.T
            sigma_r = float(s[d - total - 1])
            rows.append(
                {
                    "layer": name.removeprefix("base_model.model."),
                    "tail_max_abs_err_over_sigma_r": float(np.abs(ours - tail).max() / sigma_r),
                    "tail_rel_fro_err": float(np.linalg.norm(ours - tail) / np.linalg.norm(tail)),
                    "sigma_rel_err": float(
                        np.abs(np.sort(s0) - np.sort(s[d - total :])).max() / s[d - total :].min()
                    ),
                    "sigma_r_rel_err": abs(float(layer.masm_sigma_r["default"]) - sigma_r) / sigma_r,
                    "U0_orthonormality_err": float(np.abs(U0.T @ U0 - np.eye(total)).max()),
                    "V0_orthonormality_err": float(np.abs(V0.T @ V0 - np.eye(total)).max()),
                }
            )
        exact[method] = rows
    out["exactness_vs_float64_svd"] = exact
    return out


# ------------------------------------------------------------------------------------------ report
def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict[str, Any]) -> str:
    """The markdown tables of BENCHMARKS.md's 'Speed and memory' section."""
    lines: list[str] = []
    workers = results["workers"]

    def worker_median(model: str, method: str, key: str) -> float | None:
        vals = [w[key] for w in workers if w["model"] == model and w["method"] == method and key in w]
        return statistics.median(vals) if vals else None

    for key, block in results["training"].items():
        model = block.get("model", key)
        times = block["times"]
        ref = "lora_r8" if "lora_r8" in times else None
        lines.append(
            f"\n**{model}**, batch {block['batch_size']}, {block['steps']} timed steps "
            f"(+{block['warmup']} warm-up), CPU float32\n"
        )
        lines.append(
            "| method | trainable (adapter + head) | step s (median) | step / LoRA-r8 | step / base | "
            "peak RSS MiB | peak / LoRA-r8 | training increment MiB | increment / LoRA-r8 | "
            "inject s | load s | adapter file |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        # the fresh-process figures are listed with the batch they were measured at
        first_block = key == model
        methods = list(times) + [
            w["method"] for w in workers if first_block and w["model"] == model and w["method"] not in times
        ]
        for method in dict.fromkeys(methods):
            ts = times.get(method)
            tr = next(
                (w["trainable"] for w in workers if w["model"] == model and w["method"] == method), None
            )
            peak = worker_median(model, method, "peak_rss")
            inc = worker_median(model, method, "peak_increment")
            lora_peak = worker_median(model, "lora_r8", "peak_rss")
            lora_inc = worker_median(model, "lora_r8", "peak_increment")
            inj, load = worker_median(model, method, "inject_s"), worker_median(model, method, "load_s")
            size = worker_median(model, method, "adapter_bytes")
            if not first_block:
                peak = inc = inj = load = size = None
            cells = [
                method,
                f"{tr['adapter']:,} + {tr['head']:,}" if tr else "-",
                f"{statistics.median(ts):.2f}" if ts else "not timed",
                fmt_ratio(paired_ratio(ts, times[ref])) if ref and ts else "-",
                fmt_ratio(paired_ratio(ts, times["base"])) if "base" in times and ts else "-",
                f"{peak / 2**20:.0f}" if peak else "-",
                f"{peak / lora_peak:.3f}" if peak and lora_peak else "-",
                f"{inc / 2**20:.0f}" if inc else "-",
                f"{inc / lora_inc:.3f}" if inc and lora_inc else "-",
                f"{inj:.2f}" if inj is not None else "-",
                f"{load:.2f}" if load is not None else "-",
                f"{size / 2**20:.2f} MiB" if size else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if "lora_r1" in times and "effort" in times:
            lines.append(
                f"\nEffort config / LoRA-r1 step: {fmt_ratio(paired_ratio(times['effort'], times['lora_r1']))}"
            )

    for model, block in results.get("inference", {}).items():
        times = block["times"]
        lines.append(
            f"\n**Inference, {model}** (batch {block['batch_size']}, {block['reps']} reps, "
            "ratio = median of paired ratios [IQR])\n"
        )
        lines.append("| model | forward s (median) | / base |")
        lines.append("|---|---|---|")
        for name, ts in times.items():
            lines.append(
                f"| {name} | {statistics.median(ts):.3f} | {fmt_ratio(paired_ratio(ts, times['base']))} |"
            )
        lines.append(f"\nmerged vs unmerged max |logit diff|: {block['merge_max_abs_diff']}")

    if "mask_overhead" in results:
        mo = results["mask_overhead"]
        t = mo["times"]
        lines.append(
            f"\n**Layer-mask overhead** ({mo['model']}, batch {mo['batch_size']}, {mo['steps']} steps, "
            f"mask decisions at steps {mo['decision_steps']})\n"
        )
        lines.append(
            f"- dynamic / none, median of paired per-step ratios: {fmt_ratio(paired_ratio(t['masm_dynamic'], t['masm_nomask']))}"
        )
        lines.append(
            f"- dynamic / none, ratio of mean step times (decision steps included): "
            f"{statistics.mean(t['masm_dynamic']) / statistics.mean(t['masm_nomask']):.3f}"
        )

    if "compile" in results:
        comp = results["compile"]
        t = comp["times"]
        lines.append(
            f"\n**torch.compile** ({comp['model']}, batch {comp['batch_size']}, {comp['steps']} interleaved steps; "
            "forward + loss + regularisers compiled, backward and AdamW eager)\n"
        )
        lines.append("| method | graphs | graph breaks (in MASM code) | compile s | compiled / eager step |")
        lines.append("|---|---|---|---|---|")
        for method, facts in comp["methods"].items():
            ratio = paired_ratio(t[f"{method}_compiled"], t[f"{method}_eager"])
            lines.append(
                f"| {method} | {facts['graphs']} | {facts['graph_breaks']} ({facts['graph_breaks_in_masm_code']}) | "
                f"{facts['compile_s']:.0f} | {fmt_ratio(ratio)} |"
            )

    if "decomposition" in results:
        dec = results["decomposition"]
        tt = dec["times_s"]
        lines.append(f"\n**Decomposition of {dec['num_matrices']} attention matrices {dec['shape']}**\n")
        for k, v in tt.items():
            lines.append(f"- {k}: median {statistics.median(v):.2f} s over {len(v)} runs")
        for method, rows in dec["exactness_vs_float64_svd"].items():
            worst = {k: max(r[k] for r in rows) for k in rows[0] if k != "layer"}
            lines.append(
                f"- exactness ({method}, worst of {len(rows)} layers vs float64 SVD): "
                + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Pass/fail of each target, from the measured ratios."""
    out = []
    workers = results["workers"]

    def peak(model: str, method: str, key: str) -> float | None:
        vals = [w[key] for w in workers if w["model"] == model and w["method"] == method]
        return statistics.median(vals) if vals else None

    for key, block in results["training"].items():
        model = block.get("model", key)
        t = block["times"]
        label = f"{model} batch {block['batch_size']}"
        for m in ("masm_reg", "masm_reg_lazy4", "masm"):
            if m in t and "lora_r8" in t:
                r = paired_ratio(t[m], t["lora_r8"])
                out.append(
                    {
                        "target": f"{label} {m} step / LoRA-r8 step <= 1.10",
                        "value": r["median"],
                        "iqr": [r["q1"], r["q3"]],
                        "pass": r["median"] <= 1.10,
                    }
                )
            for rival in ("osf", "adamss"):
                if m.startswith("masm_reg") and m in t and rival in t:
                    r = paired_ratio(t[m], t[rival])
                    out.append(
                        {
                            "target": f"{label} {m} step / PEFT {rival} step <= 1.00",
                            "value": r["median"],
                            "iqr": [r["q1"], r["q3"]],
                            "pass": r["median"] <= 1.0,
                        }
                    )
            if key != model:
                continue  # memory was measured at the first batch size only
            if m in t and peak(model, m, "peak_rss") and peak(model, "lora_r8", "peak_rss"):
                v = peak(model, m, "peak_rss") / peak(model, "lora_r8", "peak_rss")
                out.append(
                    {"target": f"{model} {m} peak RSS / LoRA-r8 <= 1.05", "value": v, "pass": v <= 1.05}
                )
                v = peak(model, m, "peak_increment") / peak(model, "lora_r8", "peak_increment")
                out.append(
                    {
                        "target": f"{model} {m} training-memory increment / LoRA-r8 <= 1.05 (stricter)",
                        "value": v,
                        "pass": v <= 1.05,
                    }
                )
    for model, block in results.get("inference", {}).items():
        t = block["times"]
        for name in t:
            if name == "base":
                continue
            r = paired_ratio(t[name], t["base"])
            if name.endswith("_merged"):
                ok = r["q1"] <= 1.0 <= r["q3"] or abs(r["median"] - 1) <= 0.03
                out.append(
                    {
                        "target": f"{model} {name} / base within noise of 1.00",
                        "value": r["median"],
                        "iqr": [r["q1"], r["q3"]],
                        "pass": ok,
                    }
                )
            elif name.startswith(("masm", "effort")):
                out.append(
                    {
                        "target": f"{model} {name} / base <= 1.03 (LoRA's own ratio is the bar)",
                        "value": r["median"],
                        "iqr": [r["q1"], r["q3"]],
                        "pass": r["median"] <= 1.03,
                    }
                )
    if "mask_overhead" in results:
        t = results["mask_overhead"]["times"]
        r = paired_ratio(t["masm_dynamic"], t["masm_nomask"])
        mean_ratio = statistics.mean(t["masm_dynamic"]) / statistics.mean(t["masm_nomask"])
        out.append(
            {
                "target": "mask overhead dynamic / none (median paired) <= 1.05",
                "value": r["median"],
                "iqr": [r["q1"], r["q3"]],
                "pass": r["median"] <= 1.05,
            }
        )
        out.append(
            {
                "target": "mask overhead dynamic / none (mean, decisions included) <= 1.05",
                "value": mean_ratio,
                "pass": mean_ratio <= 1.05,
            }
        )
    if "compile" in results:
        for method, facts in results["compile"]["methods"].items():
            if is_masm(method):
                out.append(
                    {
                        "target": f"{results['compile']['model']} {method} compiled: no graph break in MASM code",
                        "value": float(facts["graph_breaks_in_masm_code"]),
                        "pass": facts["graph_breaks_in_masm_code"] == 0,
                    }
                )
    if "decomposition" in results:
        big = results["decomposition"]
        model = big["model"]
        for method in ("effort", "masm_reg"):
            inj = peak(model, method, "inject_s")
            if inj is not None:
                out.append(
                    {
                        "target": f"{model} {method} injection (get_peft_model incl. SVD, {big['num_matrices']} "
                        "matrices) <= 10 s",
                        "value": inj,
                        "pass": inj <= 10.0,
                    }
                )
    return out


# -------------------------------------------------------------------------------------------- main
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny models, few steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/speed[_quick].json)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a loaded shared 2-core machine 2-thread OpenMP regions stall)",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (ViT-B/16, clip-small x4)")
    ap.add_argument("--steps-large", type=int, default=0, help="timed training steps for ViT-L/14")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--infer-reps", type=int, default=8)
    ap.add_argument("--mem-repeats", type=int, default=1, help="fresh-process rounds per method")
    ap.add_argument("--svd-repeats", type=int, default=1)
    ap.add_argument("--exact-layers", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="leave ViT-L/14 out")
    ap.add_argument("--batch-small", type=int, default=1, help="batch size for ViT-B/16")
    ap.add_argument(
        "--batch-extra",
        type=int,
        default=8,
        help="a second ViT-B/16 batch size, timed for --methods-extra (0: none)",
    )
    ap.add_argument("--methods-small", default="base,lora_r8,masm_reg,masm_reg_lazy4,masm,effort,osf,adamss")
    ap.add_argument("--methods-extra", default="lora_r8,masm_reg,masm_reg_lazy4,osf,adamss")
    ap.add_argument("--steps-extra", type=int, default=6, help="timed steps at --batch-extra")
    ap.add_argument(
        "--methods-large",
        default="masm_reg,effort",
        help="ViT-L/14 step timing (masm_reg and effort are always built for the decomposition check)",
    )
    ap.add_argument("--workers-large", default="lora_r8,masm_reg,effort")
    ap.add_argument(
        "--compile-methods",
        default="lora_r8,masm_reg",
        help="methods whose training computation is torch.compile'd (graph breaks, compiled / eager); '' skips",
    )
    ap.add_argument("--compile-model", default="clip-small", help="model for the torch.compile section")
    ap.add_argument("--skip-workers", action="store_true", help="no fresh-process figures (development only)")
    ap.add_argument(
        "--device", help="run only the accelerator suite on this device (cuda, cpu); see device_suite.py"
    )
    ap.add_argument(
        "--dtype", help="autocast dtype of the accelerator suite (bfloat16, float16); default none"
    )
    ap.add_argument(
        "--preset",
        default="gpu",
        help="accelerator-suite preset: gpu (ViT-L/14, batch 32), host (ViT-L/14's blocks at width 64: the GPU's "
        "host-bound step on a CPU) or tiny",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="accelerator suite: also time torch.compile of LoRA's and regularised MASM's step (slow: on an H200 "
        "MASM's ViT-L/14 graph did not compile within 5 minutes)",
    )
    args = ap.parse_args()

    if args.device:
        run_device(args)
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    torch.set_num_threads(args.threads)
    import peft_masm  # noqa: F401

    rank = masm_total_rank()
    lora_default = f"lora_r{rank}"
    assert lora_default == "lora_r8", "the report assumes MASM's default K*k = 8; update MODELS/report"
    if args.quick:
        small, large, mask_model = "tiny-a", "tiny-b", "tiny-a"
        args.steps, args.steps_large, args.infer_reps = 3, 3, 3
        args.svd_repeats, args.exact_layers = 1, 2
        mask_steps = 8
    else:
        small, large, mask_model = "vit-b16", "vit-l14", "clip-small"
        mask_steps = 4 * args.steps
    b_methods = args.methods_small.split(",")
    l_methods = list(dict.fromkeys(args.methods_large.split(",") + ["masm_reg", "effort"]))
    l_workers = args.workers_large.split(",")
    b_batch, l_batch = args.batch_small, 1
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "training": {},
        "inference": {},
        "workers": [],
    }
    log(f"machine {results['machine']}")
    out = args.out or ROOT / "benchmarks" / "results" / ("speed_quick.json" if args.quick else "speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(final: bool = False) -> None:
        """Write what is measured so far (a long run keeps its partial results)."""
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["complete"] = final
        results["targets"] = targets(results)
        results["report_markdown"] = report(results)
        out.write_text(json.dumps(results, indent=1))

    # 1. training step time, interleaved; 2. inference
    trained = time_training(small, b_methods, b_batch, args.warmup, args.steps)
    results["training"][small] = {
        "model": small,
        "times": trained["times"],
        "batch_size": b_batch,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    save()
    if args.batch_extra:
        extra_steps = 2 if args.quick else args.steps_extra
        extra = time_training(
            small, args.methods_extra.split(","), args.batch_extra, args.warmup, extra_steps
        )
        results["training"][f"{small} batch {args.batch_extra}"] = {
            "model": small,
            "times": extra["times"],
            "batch_size": args.batch_extra,
            "steps": extra_steps,
            "warmup": args.warmup,
        }
        del extra
        save()
    inf = time_inference(
        small,
        trained,
        [m for m in ("masm_reg", "effort", "lora_r8") if m in b_methods],
        ["masm_reg"],
        args.warmup,
        args.infer_reps,
    )
    results["inference"][small] = {**inf, "batch_size": b_batch, "reps": args.infer_reps}
    del trained, inf
    save()

    # 3. layer-mask overhead (issue 3): dynamic vs none, decisions included
    base = build_base(mask_model)
    batch = make_batch(mask_model, 8)
    mask_trainers = {
        m: Trainer(inject(shared_copy(base), m), m, batch) for m in ("masm_dynamic", "masm_nomask")
    }
    cfg = mask_trainers["masm_dynamic"].model.base_model.peft_config["default"]
    log(f"mask overhead {mask_model}: {mask_steps} steps")
    mt = interleave({m: t.step for m, t in mask_trainers.items()}, args.warmup, mask_steps)
    decisions = list(range(cfg.mask_warmup, mask_steps + args.warmup + 1, cfg.mask_interval))
    results["mask_overhead"] = {
        "model": mask_model,
        "batch_size": 8,
        "steps": mask_steps,
        "times": mt,
        "decision_steps": decisions,
        "history_steps": mask_trainers["masm_dynamic"].model.base_model.layer_mask.history_steps,
    }
    del mask_trainers, base
    save()

    # 4. fresh-process figures (memory, injection, load, size)
    jobs = [(small, b_methods, b_batch)] + ([] if args.skip_large else [(large, l_workers, l_batch)])
    if not args.skip_workers:
        results["workers"] = run_workers(jobs, args)
    save()

    if not args.skip_large:
        trained = time_training(large, l_methods, l_batch, args.warmup, args.steps_large)
        # 5. decomposition baseline and exactness on the large model's attention projections
        dec = decomposition_check(large, {m: trained["trainers"][m] for m in ("masm_reg", "effort")}, args)
        results["decomposition"] = {**dec, "model": large}
        save()
        results["training"][large] = {
            "times": trained["times"],
            "batch_size": l_batch,
            "steps": args.steps_large,
            "warmup": args.warmup,
        }
        del trained

    if args.compile_methods:
        compile_model = "tiny-a" if args.quick else args.compile_model
        results["compile"] = compile_check(
            compile_model, args.compile_methods.split(","), 8, args.warmup, 3 if args.quick else args.steps
        )

    save(final=True)
    print(results["report_markdown"])
    print("\nTargets:")
    for t in results["targets"]:
        print(
            f"- {verdict(t['pass'])}: {t['target']}: {t['value']:.3f}"
            + (f" IQR {t['iqr'][0]:.3f}-{t['iqr'][1]:.3f}" if "iqr" in t else "")
        )
    print(f"\nwrote {out}")


def run_device(args: argparse.Namespace) -> None:
    """``--device``: the accelerator suite only (device_suite.py), one JSON."""
    import device_suite

    import peft_masm  # noqa: F401

    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        )
    if args.preset not in device_suite.PRESETS:
        raise SystemExit(f"--preset {args.preset!r}: choose one of {sorted(device_suite.PRESETS)}")
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"speed_device_{args.device.split(':')[0]}_{args.preset}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    started = time.perf_counter()

    def save(partial: dict[str, Any]) -> None:
        out.write_text(
            json.dumps({**partial, "wall_s": time.perf_counter() - started, "machine": facts}, indent=1)
        )

    suite = device_suite.run_device_suite(
        sys.modules[__name__],
        args.device,
        args.dtype,
        args.preset,
        on_progress=save,
        compile_methods=device_suite.COMPILED_METHODS if args.compile else (),
    )
    save(suite)
    for method, facts_of in suite["methods"].items():
        ratio = suite.get("step_ratio_vs_lora", {}).get(method)
        increment = facts_of["train_memory_increment_bytes"]
        print(
            f"{method}: step {suite['step_median_s'][method]:.4f} s"
            + (f", / LoRA {fmt_ratio(ratio)}" if ratio else "")
            + f", inject {facts_of['inject_s']:.2f} s"
            + (f", training memory {increment / 2**30:.2f} GiB" if increment else "")
        )
    for name, ratio in suite["inference_ratio_vs_base"].items():
        print(f"inference {name} / base {fmt_ratio(ratio)}")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    if suite["errors"]:
        raise SystemExit(
            "device suite: "
            + "; ".join(f"{name} failed ({why})" for name, why in suite["errors"].items())
            + f"; the other figures are in {out}"
        )


if __name__ == "__main__":
    main()
