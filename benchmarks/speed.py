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

Methods are files of the registry (``recipes/methods/<name>.yaml``, ``peft_masm.recipe.methods``), the targets'
limits are ``benchmarks/targets.yaml`` (``speed_report.py``), and the models, the timed step and the statistics
are ``harness.py``, shared with ``device_suite.py`` (``--device``) and the other speed benchmarks.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import (  # noqa: F401  (MODELS, summary, method_config: used through this module by other scripts)
    MODELS,
    ROOT,
    Trainer,
    build_base,
    fmt_ratio,
    inject,
    interleave,
    is_masm,
    log,
    loss_and_steps,
    machine_facts,
    make_batch,
    masm_total_rank,
    method_config,
    paired_ratio,
    param_counts,
    shared_copy,
    summary,
    time_training,
)
from speed_report import report, targets, verdict
from torch import nn


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


def compile_check(
    model_name: str, methods: list[str], batch_size: int, warmup: int, steps: int
) -> dict[str, Any]:
    """``torch.compile`` of the training computation (forward and loss, ``harness.loss_and_steps``): graph breaks
    from ``torch._dynamo.explain`` and the compiled / eager step ratio, interleaved, per method."""
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


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
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
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.device:
        run_device(args)
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    import peft_masm  # noqa: F401

    assert f"lora_r{masm_total_rank()}" == "lora_r8", "the report assumes MASM's default K*k = 8"
    run_cpu_suite(args)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The models, methods and lengths of a CPU run (``--quick`` shrinks them, and ``args``' step counts)."""
    if args.quick:
        small, large, mask_model = "tiny-a", "tiny-b", "tiny-a"
        args.steps, args.steps_large, args.infer_reps = 3, 3, 3
        args.svd_repeats, args.exact_layers = 1, 2
        mask_steps = 8
    else:
        small, large, mask_model = "vit-b16", "vit-l14", "clip-small"
        mask_steps = 4 * args.steps
    return {
        "small": small,
        "large": large,
        "mask_model": mask_model,
        "mask_steps": mask_steps,
        "small_methods": args.methods_small.split(","),
        "large_methods": list(dict.fromkeys(args.methods_large.split(",") + ["masm_reg", "effort"])),
        "large_workers": args.workers_large.split(","),
    }


def run_cpu_suite(args: argparse.Namespace) -> None:
    """The CPU run: training, inference, layer-mask overhead, fresh-process figures, the large model and
    ``torch.compile``, saved after each stage (a long run keeps its partial results)."""
    p = plan(args)
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
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["complete"] = final
        results["targets"] = targets(results)
        results["report_markdown"] = report(results)
        out.write_text(json.dumps(results, indent=1))

    time_small_model(args, p, results, save)  # 1. training step time, interleaved; 2. inference
    results["mask_overhead"] = mask_overhead(p["mask_model"], p["mask_steps"], args.warmup)  # 3. (issue 3)
    save()
    # 4. fresh-process figures (memory, injection, load, size)
    jobs = [(p["small"], p["small_methods"], args.batch_small)]
    jobs += [] if args.skip_large else [(p["large"], p["large_workers"], 1)]
    if not args.skip_workers:
        results["workers"] = run_workers(jobs, args)
    save()
    if not args.skip_large:
        time_large_model(args, p, results, save)  # 5. decomposition and training on the large model
    if args.compile_methods:
        compile_model = "tiny-a" if args.quick else args.compile_model
        results["compile"] = compile_check(
            compile_model, args.compile_methods.split(","), 8, args.warmup, 3 if args.quick else args.steps
        )
    save(final=True)
    print_summary(results, out)


def time_small_model(
    args: argparse.Namespace, p: dict[str, Any], results: dict[str, Any], save: Callable[[], None]
) -> None:
    """Training steps at ``--batch-small`` and ``--batch-extra``, then inference, on the small model."""
    small, methods = p["small"], p["small_methods"]
    trained = time_training(small, methods, args.batch_small, args.warmup, args.steps)
    results["training"][small] = {
        "model": small,
        "times": trained["times"],
        "batch_size": args.batch_small,
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
    unmerged = [m for m in ("masm_reg", "effort", "lora_r8") if m in methods]
    inf = time_inference(small, trained, unmerged, ["masm_reg"], args.warmup, args.infer_reps)
    results["inference"][small] = {**inf, "batch_size": args.batch_small, "reps": args.infer_reps}
    save()


def mask_overhead(model_name: str, steps: int, warmup: int) -> dict[str, Any]:
    """MASM with the dynamic layer mask against none, interleaved, mask decisions included."""
    base = build_base(model_name)
    batch = make_batch(model_name, 8)
    trainers = {m: Trainer(inject(shared_copy(base), m), m, batch) for m in ("masm_dynamic", "masm_nomask")}
    cfg = trainers["masm_dynamic"].model.base_model.peft_config["default"]
    log(f"mask overhead {model_name}: {steps} steps")
    times = interleave({m: t.step for m, t in trainers.items()}, warmup, steps)
    return {
        "model": model_name,
        "batch_size": 8,
        "steps": steps,
        "times": times,
        "decision_steps": list(range(cfg.mask_warmup, steps + warmup + 1, cfg.mask_interval)),
        "history_steps": trainers["masm_dynamic"].model.base_model.layer_mask.history_steps,
    }


def time_large_model(
    args: argparse.Namespace, p: dict[str, Any], results: dict[str, Any], save: Callable[[], None]
) -> None:
    """The large model: the decomposition against a per-layer SVD (and its exactness), then the step times."""
    large = p["large"]
    trained = time_training(large, p["large_methods"], 1, args.warmup, args.steps_large)
    dec = decomposition_check(large, {m: trained["trainers"][m] for m in ("masm_reg", "effort")}, args)
    results["decomposition"] = {**dec, "model": large}
    save()
    results["training"][large] = {
        "times": trained["times"],
        "batch_size": 1,
        "steps": args.steps_large,
        "warmup": args.warmup,
    }


def print_summary(results: dict[str, Any], out: Path) -> None:
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
        args.device,
        args.dtype,
        args.preset,
        on_progress=save,
        compile_methods=device_suite.COMPILED_METHODS if args.compile else (),
    )
    save(suite)
    print_device_summary(suite)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    if suite["errors"]:
        raise SystemExit(
            "device suite: "
            + "; ".join(f"{name} failed ({why})" for name, why in suite["errors"].items())
            + f"; the other figures are in {out}"
        )


def print_device_summary(suite: dict[str, Any]) -> None:
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


if __name__ == "__main__":
    main()
