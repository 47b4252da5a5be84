"""The report of a comparison (``recipes/compare.py``): ``summary.json``, ``table.md`` and ``forest.png``.

Per method: the chosen learning rate and the validation metric of each rate tried, trainable parameters, seconds
per run, and per test set the frame AUC (video AUC where a set has videos) as a mean over seeds. Each method's
paired difference to the reference (:mod:`peft_masm.metrics.paired`), per test set and on average over the
config's test sets, with a 95 % bootstrap interval over seeds and test items. The noise-floor row is the reference
trained again with other seeds and paired against itself: a difference of that size is what chance alone gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics.detection import group_by_video
from ..metrics.paired import PairedScores, frame_auc, paired_difference
from . import methods as registry

__all__ = ["summarise", "table_markdown", "plot_forest", "write_report"]

Items = dict[str, dict[str, list[Any]]]


def _video_auc(labels: np.ndarray, scores: np.ndarray, video_ids: list[str]) -> float | None:
    """AUC of the per-video mean scores, where some video has several frames (else None)."""
    if len(set(video_ids)) == len(video_ids):
        return None
    v_labels, v_scores, _, _ = group_by_video(labels, scores, video_ids)
    return frame_auc(v_labels, v_scores)


def _scores(runs: list[dict[str, Any]], test_set: str) -> np.ndarray:
    """The (seeds, items) fake probabilities of ``runs`` on ``test_set``, in seed order."""
    return np.array([r["test_scores"][test_set] for r in sorted(runs, key=lambda r: r["seed"])])


def _set_means(runs: list[dict[str, Any]], items: Items) -> dict[str, dict[str, float]]:
    """Per test set: mean frame AUC over seeds, its seed standard deviation, and the mean video AUC if any."""
    out = {}
    for name, item in items.items():
        labels, scores = np.asarray(item["labels"]), _scores(runs, name)
        aucs = [frame_auc(labels, s) for s in scores]
        row = {"frame_auc": float(np.mean(aucs)), "frame_auc_seed_sd": float(np.std(aucs))}
        videos = [_video_auc(labels, s, item["video_ids"]) for s in scores]
        if videos[0] is not None:
            row["video_auc"] = float(np.mean([v for v in videos if v is not None]))
        out[name] = row
    return out


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], items: Items, top_level: list[str],
            n_bootstrap: int) -> dict[str, list[float]]:  # fmt: skip
    """Runs ``a`` minus runs ``b`` (paired by seed order): per test set and on average over ``top_level``."""
    sets = {name: PairedScores(np.asarray(item["labels"]), _scores(a, name), _scores(b, name),
                               np.asarray(item["video_ids"])) for name, item in items.items()}  # fmt: skip
    out = {name: list(vars(paired_difference([s], n_bootstrap)).values()) for name, s in sets.items()}
    out["average"] = list(vars(paired_difference([sets[n] for n in top_level], n_bootstrap)).values())
    return out


def _row(method: str, runs: list[dict[str, Any]], sweep: list[dict[str, Any]], items: Items,
         top_level: list[str]) -> dict[str, Any]:  # fmt: skip
    tests = _set_means(runs, items)
    return {
        "method": registry.method_name(method),
        "description": registry.spec(method).get("description", ""),
        "learning_rate": runs[0]["learning_rate"],
        "sweep": {f"{r['learning_rate']:g}": r["val_metric"] for r in sweep},
        "seeds": sorted(r["seed"] for r in runs),
        "trainable_backbone": runs[0]["trainable"]["backbone"],
        "trainable_head": runs[0]["trainable"]["head"],
        "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
        "val_auc": float(np.mean([r["val_auc"] for r in runs])),
        "tests": tests,
        "average_frame_auc": float(np.mean([tests[n]["frame_auc"] for n in top_level])),
        **({"adapted_layers": [r["layers"] for r in runs]} if "layers" in runs[0] else {}),
    }


def summarise(methods: list[str], reference: str, runs: list[dict[str, Any]], items: Items, top_level: list[str],
              n_bootstrap: int = 1000) -> dict[str, Any]:  # fmt: skip
    """The summary of a finished comparison (``summary.json``): a row per method (in ``methods`` order), paired
    against ``reference``, and the noise-floor row."""
    by = {(r["method"], r["stage"]): [] for r in runs}  # type: dict[tuple[str, str], list[dict[str, Any]]]
    for r in runs:
        by[(r["method"], r["stage"])].append(r)
    ref = registry.method_name(reference)
    rows = []
    for method in methods:
        name = registry.method_name(method)
        row = _row(method, by[(name, "test")], by.get((name, "sweep"), []), items, top_level)
        if name != ref:
            row["vs_reference"] = _paired(
                by[(name, "test")], by[(ref, "test")], items, top_level, n_bootstrap
            )
        rows.append(row)
    noise = _row(reference, by[(ref, "noise")], [], items, top_level)
    noise.update(method=f"{ref} (other seeds)", noise_floor=True)
    noise["vs_reference"] = _paired(by[(ref, "noise")], by[(ref, "test")], items, top_level, n_bootstrap)
    return {"reference": ref, "test_sets": list(items), "averaged_over": top_level, "n_bootstrap": n_bootstrap,
            "rows": rows + [noise]}  # fmt: skip


def _interval(value: list[float] | None) -> str:
    if value is None:
        return "reference"
    point, low, high = value
    return f"{point:+.3f} [{low:+.3f}, {high:+.3f}]"


def table_markdown(summary: dict[str, Any]) -> str:
    """``table.md``: the main table, the paired differences per test set, and how to read them."""
    sets, ref = summary["test_sets"], summary["reference"]
    lines = ["| method | learning rate | trainable (backbone + head) | validation AUC | "
             + " | ".join(f"{s} AUC" for s in sets) + f" | mean AUC | vs {ref} (paired, 95 % CI) | s/run |",
             "|" + "---|" * (len(sets) + 7)]  # fmt: skip
    for row in summary["rows"]:
        aucs = " | ".join(f"{row['tests'][s]['frame_auc']:.3f}" for s in sets)
        params = f"{row['trainable_backbone']:,} + {row['trainable_head']:,}"
        vs = row.get("vs_reference", {}).get("average")
        lines.append(f"| {row['method']} | {row['learning_rate']:g} | {params} | {row['val_auc']:.3f} | {aucs} | "
                     f"{row['average_frame_auc']:.3f} | {_interval(vs)} | {row['seconds_per_run']:.3g} |")  # fmt: skip
    lines += ["", f"Paired difference to {ref} per test set (frame AUC, 95 % CI):", "",
              "| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]  # fmt: skip
    for row in summary["rows"]:
        if "vs_reference" in row:
            cells = " | ".join(_interval(row["vs_reference"][s]) for s in sets)
            lines.append(f"| {row['method']} | {cells} |")
    videos = [s for s in sets if "video_auc" in summary["rows"][0]["tests"][s]]
    if videos:
        lines += ["", "Video AUC (mean frame score per video):", "", "| method | " + " | ".join(videos) + " |",
                  "|" + "---|" * (len(videos) + 1)]  # fmt: skip
        for row in summary["rows"]:
            lines.append(
                f"| {row['method']} | "
                + " | ".join(f"{row['tests'][s]['video_auc']:.3f}" for s in videos)
                + " |"
            )
    noise = summary["rows"][-1]["vs_reference"]["average"]
    lines += ["", f"Noise floor: {ref} trained again with other seeds differs from itself by {noise[0]:+.3f} "
              f"[{noise[1]:+.3f}, {noise[2]:+.3f}] on average. A method whose difference to {ref} is no larger than "
              "that is not shown to differ, even where its interval excludes 0. Mean AUC and the average "
              f"difference are over {', '.join(summary['averaged_over'])}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_forest(summary: dict[str, Any], path: Path) -> None:
    """``forest.png``: each method's average paired difference to the reference, with the noise floor's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if "vs_reference" in r]
    noise = abs(summary["rows"][-1]["vs_reference"]["average"][0])
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(rows) + 1.2))
    ax.axvspan(-noise, noise, color="0.9", label=f"noise floor (+-{noise:.3f})")
    for k, row in enumerate(rows):
        point, low, high = row["vs_reference"]["average"]
        ax.plot([low, high], [k, k], color="k")
        ax.plot(point, k, "o", color="C3" if row.get("noise_floor") else "C0")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_xlabel(f"mean AUC minus {summary['reference']}'s (paired, 95 % bootstrap CI)")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, methods: list[str], reference: str, runs: list[dict[str, Any]], items: Items,
                 top_level: list[str], n_bootstrap: int = 1000) -> dict[str, Any]:  # fmt: skip
    """Write ``summary.json``, ``table.md``, ``forest.png`` and ``test_items.json`` (each test set's labels and video
    ids, which the runs' scores are in the order of) into ``out``; returns the summary."""
    summary = summarise(methods, reference, runs, items, top_level, n_bootstrap)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "test_items.json").write_text(json.dumps(items) + "\n")
    (out / "table.md").write_text(table_markdown(summary))
    plot_forest(summary, out / "forest.png")
    return summary
