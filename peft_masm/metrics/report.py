"""Writing metric results: JSON, a Markdown table, and ROC curves as a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .detection import binary_clf_curve, roc_from_counts, validate_inputs

TABLE_COLUMNS: tuple[str, ...] = (
    "frame_auc",
    "frame_eer",
    "frame_ap",
    "frame_acc",
    "video_auc",
    "video_eer",
    "video_ap",
    "video_acc",
)


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    ci = metrics.get(f"{key}_ci")
    if ci is None or any(c is None or math.isnan(c) for c in ci):
        return f"{value:.4f}"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def results_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: one row per test set, one column per metric present ("value [95% CI]")."""
    columns = [c for c in TABLE_COLUMNS if any(c in m for m in results.values())]
    lines = [
        "| test set | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, metrics in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics, c) for c in columns) + " |")
    lines.append("")
    lines.append("Values are point estimates with 95% percentile-bootstrap intervals; label 1 = fake.")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """NaN/inf become null so that results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_results(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (strict JSON, NaN as null) and ``results.md`` (test set name -> metrics dict)."""
    if not results:
        raise ValueError("results is empty; pass {test_set_name: compute_detection_metrics(...)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(_jsonable(results), indent=2, sort_keys=True, allow_nan=False) + "\n")
    md_path.write_text(results_markdown(results))
    return json_path, md_path


def plot_roc(
    curves: Mapping[str, tuple[Sequence[int] | np.ndarray, Sequence[float] | np.ndarray]],
    path: str | Path,
    title: str = "ROC",
) -> Path:
    """Draw one ROC curve per name (labels, scores) with its AUC in the legend; write a PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .detection import auc_from_roc

    if not curves:
        raise ValueError("curves is empty; pass {name: (labels, scores)}.")
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (labels, scores) in curves.items():
        fpr, tpr = roc_from_counts(*binary_clf_curve(*validate_inputs(labels, scores))[:2])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc_from_roc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
