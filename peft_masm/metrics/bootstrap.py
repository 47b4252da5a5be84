"""Percentile bootstrap intervals for the detection metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .detection import METRIC_NAMES, point_metrics


@dataclass(frozen=True)
class BootstrapResult:
    """Per-metric ``(low, high)`` interval and how many resamples were usable (had both classes)."""

    intervals: dict[str, tuple[float, float]]
    n_used: int
    n_requested: int


def percentile_bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float] | None],
    n_units: int,
    n_bootstrap: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Resample ``n_units`` units with replacement; ``statistic`` returns None for an unusable resample (skipped)."""
    samples: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for _ in range(n_bootstrap):
        value = statistic(rng.integers(0, n_units, size=n_units))
        if value is None:
            continue
        for name in METRIC_NAMES:
            samples[name].append(value[name])
    n_used = len(samples[METRIC_NAMES[0]])
    tail = 100.0 * (1.0 - confidence) / 2.0
    intervals = {
        name: (float(np.percentile(vals, tail)), float(np.percentile(vals, 100.0 - tail)))
        if vals
        else (float("nan"), float("nan"))
        for name, vals in samples.items()
    }
    return BootstrapResult(intervals, n_used, n_bootstrap)


def sample_statistic(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> Callable[[np.ndarray], dict[str, float] | None]:
    """Statistic over resampled samples (frames, or videos for video-level metrics)."""

    def statistic(idx: np.ndarray) -> dict[str, float] | None:
        y = labels[idx]
        if y.min() == y.max():
            return None
        return point_metrics(y, scores[idx], threshold)

    return statistic


def clustered_statistic(
    labels: np.ndarray, scores: np.ndarray, frames_of: Sequence[np.ndarray], threshold: float
) -> Callable[[np.ndarray], dict[str, float] | None]:
    """Statistic over the frames of resampled videos (frames of one video are not independent)."""

    def statistic(idx: np.ndarray) -> dict[str, float] | None:
        frame_idx = np.concatenate([frames_of[i] for i in idx])
        y = labels[frame_idx]
        if y.min() == y.max():
            return None
        return point_metrics(y, scores[frame_idx], threshold)

    return statistic
