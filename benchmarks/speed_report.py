"""The report of ``speed.py``: BENCHMARKS.md's markdown tables and the pass/fail of each target, from one result
JSON. The targets' limits are data, ``benchmarks/targets.yaml``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml
from harness import fmt_ratio, paired_ratio

TARGETS_FILE = Path(__file__).resolve().parent / "targets.yaml"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_limits(path: Path = TARGETS_FILE) -> dict[str, Any]:
    """The targets' limits (``benchmarks/targets.yaml``)."""
    return yaml.safe_load(path.read_text())


def _worker_median(workers: list[dict[str, Any]], model: str, method: str, key: str) -> float | None:
    """The median of ``key`` over the fresh-process rounds of ``method`` on ``model`` (None: not measured)."""
    vals = [w[key] for w in workers if w["model"] == model and w["method"] == method and key in w]
    return statistics.median(vals) if vals else None


def _label(method: str) -> str:
    """A method as the targets name it (``lora_r8`` -> ``LoRA-r8``)."""
    return method.replace("lora_r", "LoRA-r")


def _iqr(r: dict[str, float]) -> list[float]:
    return [r["q1"], r["q3"]]


# ------------------------------------------------------------------------------------------------ report
def report(results: dict[str, Any]) -> str:
    """The markdown tables of BENCHMARKS.md's 'Speed and memory' section."""
    lines: list[str] = []
    for key, block in results["training"].items():
        lines += _training_table(key, block, results["workers"])
    for model, block in results.get("inference", {}).items():
        lines += _inference_table(model, block)
    if "mask_overhead" in results:
        lines += _mask_overhead_lines(results["mask_overhead"])
    if "compile" in results:
        lines += _compile_table(results["compile"])
    if "decomposition" in results:
        lines += _decomposition_lines(results["decomposition"])
    return "\n".join(lines)


def _training_table(key: str, block: dict[str, Any], workers: list[dict[str, Any]]) -> list[str]:
    """One timed block (a model at a batch size): step times and ratios, with the fresh-process figures."""
    model = block.get("model", key)
    times = block["times"]
    lines = [
        f"\n**{model}**, batch {block['batch_size']}, {block['steps']} timed steps "
        f"(+{block['warmup']} warm-up), CPU float32\n",
        "| method | trainable (adapter + head) | step s (median) | step / LoRA-r8 | step / base | "
        "peak RSS MiB | peak / LoRA-r8 | training increment MiB | increment / LoRA-r8 | "
        "inject s | load s | adapter file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the fresh-process figures are listed with the batch they were measured at
    first_block = key == model
    methods = list(times) + [
        w["method"] for w in workers if first_block and w["model"] == model and w["method"] not in times
    ]
    for method in dict.fromkeys(methods):
        cells = [method, *_training_cells(model, method, times, workers, first_block)]
        lines.append("| " + " | ".join(cells) + " |")
    if "lora_r1" in times and "effort" in times:
        lines.append(
            f"\nEffort config / LoRA-r1 step: {fmt_ratio(paired_ratio(times['effort'], times['lora_r1']))}"
        )
    return lines


def _training_cells(
    model: str, method: str, times: dict[str, list[float]], workers: list[dict[str, Any]], first_block: bool
) -> list[str]:
    """The cells of one method's row of ``_training_table`` after its name."""
    ts = times.get(method)
    ref = "lora_r8" if "lora_r8" in times else None
    tr = next((w["trainable"] for w in workers if w["model"] == model and w["method"] == method), None)
    figures = {
        key: _worker_median(workers, model, method, key) if first_block else None
        for key in ("peak_rss", "peak_increment", "inject_s", "load_s", "adapter_bytes")
    }
    peak, inc, size = figures["peak_rss"], figures["peak_increment"], figures["adapter_bytes"]
    inj, load = figures["inject_s"], figures["load_s"]
    lora_peak = _worker_median(workers, model, "lora_r8", "peak_rss")
    lora_inc = _worker_median(workers, model, "lora_r8", "peak_increment")
    return [
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


def _inference_table(model: str, block: dict[str, Any]) -> list[str]:
    times = block["times"]
    lines = [
        f"\n**Inference, {model}** (batch {block['batch_size']}, {block['reps']} reps, "
        "ratio = median of paired ratios [IQR])\n",
        "| model | forward s (median) | / base |",
        "|---|---|---|",
    ]
    for name, ts in times.items():
        lines.append(
            f"| {name} | {statistics.median(ts):.3f} | {fmt_ratio(paired_ratio(ts, times['base']))} |"
        )
    lines.append(f"\nmerged vs unmerged max |logit diff|: {block['merge_max_abs_diff']}")
    return lines


def _mask_overhead_lines(mo: dict[str, Any]) -> list[str]:
    t = mo["times"]
    return [
        f"\n**Layer-mask overhead** ({mo['model']}, batch {mo['batch_size']}, {mo['steps']} steps, "
        f"mask decisions at steps {mo['decision_steps']})\n",
        "- dynamic / none, median of paired per-step ratios: "
        f"{fmt_ratio(paired_ratio(t['masm_dynamic'], t['masm_nomask']))}",
        f"- dynamic / none, ratio of mean step times (decision steps included): "
        f"{statistics.mean(t['masm_dynamic']) / statistics.mean(t['masm_nomask']):.3f}",
    ]


def _compile_table(comp: dict[str, Any]) -> list[str]:
    t = comp["times"]
    lines = [
        f"\n**torch.compile** ({comp['model']}, batch {comp['batch_size']}, {comp['steps']} interleaved steps; "
        "forward + loss compiled (+ regularisers on the explicit path; with step hooks they run in the optimizer "
        "step), backward and AdamW eager)\n",
        "| method | graphs | graph breaks (in MASM code) | compile s | compiled / eager step |",
        "|---|---|---|---|---|",
    ]
    for method, facts in comp["methods"].items():
        ratio = paired_ratio(t[f"{method}_compiled"], t[f"{method}_eager"])
        lines.append(
            f"| {method} | {facts['graphs']} | {facts['graph_breaks']} ({facts['graph_breaks_in_masm_code']}) | "
            f"{facts['compile_s']:.0f} | {fmt_ratio(ratio)} |"
        )
    return lines


def _decomposition_lines(dec: dict[str, Any]) -> list[str]:
    lines = [f"\n**Decomposition of {dec['num_matrices']} attention matrices {dec['shape']}**\n"]
    for k, v in dec["times_s"].items():
        lines.append(f"- {k}: median {statistics.median(v):.2f} s over {len(v)} runs")
    for method, rows in dec["exactness_vs_float64_svd"].items():
        worst = {k: max(r[k] for r in rows) for k in rows[0] if k != "layer"}
        lines.append(
            f"- exactness ({method}, worst of {len(rows)} layers vs float64 SVD): "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
        )
    return lines


# ----------------------------------------------------------------------------------------------- targets
def targets(results: dict[str, Any], limits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Pass/fail of each target, from the measured ratios, against ``limits`` (default: ``targets.yaml``)."""
    limits = limits or load_limits()
    out: list[dict[str, Any]] = []
    for key, block in results["training"].items():
        out += _training_targets(key, block, results["workers"], limits)
    for model, block in results.get("inference", {}).items():
        out += _inference_targets(model, block["times"], limits["inference"])
    if "mask_overhead" in results:
        out += _mask_overhead_targets(results["mask_overhead"]["times"], limits["mask_overhead"])
    if "compile" in results:
        out += _compile_targets(results["compile"], limits["compile"])
    if "decomposition" in results:
        out += _injection_targets(results["decomposition"], results["workers"], limits["injection"])
    return out


def _ratio_target(target: str, r: dict[str, float], limit: float) -> dict[str, Any]:
    return {
        "target": f"{target} <= {limit:.2f}",
        "value": r["median"],
        "iqr": _iqr(r),
        "pass": r["median"] <= limit,
    }


def _training_targets(
    key: str, block: dict[str, Any], workers: list[dict[str, Any]], limits: dict[str, Any]
) -> list[dict[str, Any]]:
    """Step ratios against LoRA and the rivals, and (first batch size only) memory against LoRA."""
    model = block.get("model", key)
    t = block["times"]
    label = f"{model} batch {block['batch_size']}"
    step, rivals, memory = limits["step"], limits["step_vs_rivals"], limits["memory"]
    out = []
    for m in dict.fromkeys(step["methods"] + rivals["methods"] + memory["methods"]):
        base = step["baseline"]
        if m in step["methods"] and m in t and base in t:
            r = paired_ratio(t[m], t[base])
            out.append(_ratio_target(f"{label} {m} step / {_label(base)} step", r, step["max_ratio"]))
        for rival in rivals["rivals"] if m in rivals["methods"] else ():
            if m in t and rival in t:
                r = paired_ratio(t[m], t[rival])
                out.append(_ratio_target(f"{label} {m} step / PEFT {rival} step", r, rivals["max_ratio"]))
        if key == model and m in memory["methods"] and m in t:  # memory was measured at the first batch size
            out += _memory_targets(model, m, workers, memory)
    return out


def _memory_targets(
    model: str, method: str, workers: list[dict[str, Any]], memory: dict[str, Any]
) -> list[dict[str, Any]]:
    base = memory["baseline"]
    peak, base_peak = (_worker_median(workers, model, m, "peak_rss") for m in (method, base))
    if not (peak and base_peak):
        return []
    inc = _worker_median(workers, model, method, "peak_increment")
    base_inc = _worker_median(workers, model, base, "peak_increment")
    v, w = peak / base_peak, inc / base_inc
    peak_max, inc_max = memory["max_peak_ratio"], memory["max_increment_ratio"]
    return [
        {
            "target": f"{model} {method} peak RSS / {_label(base)} <= {peak_max:.2f}",
            "value": v,
            "pass": v <= peak_max,
        },
        {
            "target": f"{model} {method} training-memory increment / {_label(base)} <= {inc_max:.2f} (stricter)",
            "value": w,
            "pass": w <= inc_max,
        },
    ]


def _inference_targets(model: str, t: dict[str, list[float]], limits: dict[str, Any]) -> list[dict[str, Any]]:
    """Merged models within noise of the base; unmerged MASM within ``max_unmerged_ratio`` of it."""
    out = []
    for name in t:
        if name == "base":
            continue
        r = paired_ratio(t[name], t["base"])
        if name.endswith("_merged"):
            ok = r["q1"] <= 1.0 <= r["q3"] or abs(r["median"] - 1) <= limits["merged_tolerance"]
            target = f"{model} {name} / base within noise of 1.00"
            out.append({"target": target, "value": r["median"], "iqr": _iqr(r), "pass": ok})
        elif name.startswith(("masm", "effort")):
            limit = limits["max_unmerged_ratio"]
            out.append(
                {
                    "target": f"{model} {name} / base <= {limit:.2f} (LoRA's own ratio is the bar)",
                    "value": r["median"],
                    "iqr": _iqr(r),
                    "pass": r["median"] <= limit,
                }
            )
    return out


def _mask_overhead_targets(t: dict[str, list[float]], limits: dict[str, Any]) -> list[dict[str, Any]]:
    r = paired_ratio(t["masm_dynamic"], t["masm_nomask"])
    mean_ratio = statistics.mean(t["masm_dynamic"]) / statistics.mean(t["masm_nomask"])
    limit = limits["max_ratio"]
    return [
        _ratio_target("mask overhead dynamic / none (median paired)", r, limit),
        {
            "target": f"mask overhead dynamic / none (mean, decisions included) <= {limit:.2f}",
            "value": mean_ratio,
            "pass": mean_ratio <= limit,
        },
    ]


def _compile_targets(comp: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    from peft_masm.recipe.methods import is_masm

    most = limits["max_graph_breaks_in_masm_code"]
    allowed = "no graph break" if most == 0 else f"at most {most} graph breaks"
    return [
        {
            "target": f"{comp['model']} {method} compiled: {allowed} in MASM code",
            "value": float(facts["graph_breaks_in_masm_code"]),
            "pass": facts["graph_breaks_in_masm_code"] <= most,
        }
        for method, facts in comp["methods"].items()
        if is_masm(method)
    ]


def _injection_targets(
    dec: dict[str, Any], workers: list[dict[str, Any]], limits: dict[str, Any]
) -> list[dict[str, Any]]:
    model, most = dec["model"], limits["max_seconds"]
    out = []
    for method in limits["methods"]:
        inj = _worker_median(workers, model, method, "inject_s")
        if inj is not None:
            out.append(
                {
                    "target": f"{model} {method} injection (get_peft_model incl. SVD, {dec['num_matrices']} "
                    f"matrices) <= {most:g} s",
                    "value": inj,
                    "pass": inj <= most,
                }
            )
    return out
