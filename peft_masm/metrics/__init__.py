"""Detection metrics: frame/video AUC, EER, AP, accuracy with bootstrap intervals, and the `evaluate` module.

Nothing heavy is imported here: matplotlib and evaluate load inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .compute import compute_detection_metrics
from .report import plot_roc, results_markdown, write_results

if TYPE_CHECKING:
    import evaluate

EVALUATE_MODULE_DIR: Path = Path(__file__).resolve().parent / "masm_detection"


def load_metric(config_name: str = "default", **kwargs: object) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the packaged ``masm_detection`` module by path (works with HF_HUB_OFFLINE=1).

    ``config_name="video"`` adds a ``video_ids`` input for video-level metrics.
    """
    import evaluate

    return evaluate.load(str(EVALUATE_MODULE_DIR), config_name, **kwargs)


__all__ = [
    "EVALUATE_MODULE_DIR",
    "compute_detection_metrics",
    "load_metric",
    "plot_roc",
    "results_markdown",
    "write_results",
]
