"""``compute_detection_metrics``: frame- and video-level metrics with bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import BootstrapResult, clustered_statistic, percentile_bootstrap, sample_statistic
from .detection import METRIC_NAMES, group_by_video, point_metrics, validate_inputs

CONFIDENCE = 0.95


def _check_options(threshold: float, n_bootstrap: int) -> None:
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0 (0 disables the intervals), got {n_bootstrap}.")


def _add_level(
    out: dict[str, Any], level: str, point: dict[str, float], boot: BootstrapResult | None
) -> None:
    for name in METRIC_NAMES:
        out[f"{level}_{name}"] = point[name]
        if boot is not None:
            out[f"{level}_{name}_ci"] = list(boot.intervals[name])


def _bootstrap_info(n_bootstrap: int, seed: int, unit: str, used: dict[str, int]) -> dict[str, Any]:
    return {
        "n_requested": n_bootstrap,
        "n_used": used,
        "resampled_unit": unit,
        "confidence": CONFIDENCE,
        "seed": seed,
        "note": "resamples containing a single class are skipped; n_used counts the rest",
    }


def compute_detection_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    video_ids: Sequence[object] | np.ndarray | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Frame (and, with ``video_ids``, video) AUC, EER, AP and accuracy, each with a 95% bootstrap interval.

    ``labels``: 0 real / 1 fake per frame. ``scores``: fake probability per frame. Accuracy counts
    ``score >= threshold`` as fake; EER is interpolated between ROC points (DeepfakeBench: ``>`` and the
    nearest ROC point; see ``docs/metrics.md``). A video's score is the exact (``math.fsum``) mean of its
    frames' probabilities, independent of frame order, and its label is its frames' label (mixed labels
    raise). With
    ``video_ids`` the bootstrap resamples videos for both levels, since frames of one video are correlated.
    Keys: ``frame_auc``, ``frame_auc_ci`` ([low, high]), ... ``video_acc_ci``, counts and ``bootstrap``.
    """
    y, s = validate_inputs(labels, scores)
    _check_options(threshold, n_bootstrap)
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "n_frames": int(y.size),
        "n_fake_frames": int(y.sum()),
    }
    frame_point = point_metrics(y, s, threshold)
    used: dict[str, int] = {}
    if video_ids is None:
        boot = None
        if n_bootstrap:
            boot = percentile_bootstrap(
                sample_statistic(y, s, threshold), y.size, n_bootstrap, np.random.default_rng(seed)
            )
            used["frame"] = boot.n_used
        _add_level(out, "frame", frame_point, boot)
        unit = "frame"
    else:
        v_y, v_s, frames_of, _ = group_by_video(y, s, video_ids)
        validate_inputs(v_y, v_s)
        out.update(n_videos=int(v_y.size), n_fake_videos=int(v_y.sum()))
        frame_boot = video_boot = None
        if n_bootstrap:
            frame_stat = clustered_statistic(y, s, frames_of, threshold)
            frame_boot = percentile_bootstrap(frame_stat, v_y.size, n_bootstrap, np.random.default_rng(seed))
            video_stat = sample_statistic(v_y, v_s, threshold)
            video_boot = percentile_bootstrap(video_stat, v_y.size, n_bootstrap, np.random.default_rng(seed))
            used.update(frame=frame_boot.n_used, video=video_boot.n_used)
        _add_level(out, "frame", frame_point, frame_boot)
        _add_level(out, "video", point_metrics(v_y, v_s, threshold), video_boot)
        unit = "video"
    if n_bootstrap:
        out["bootstrap"] = _bootstrap_info(n_bootstrap, seed, unit, used)
    return out
