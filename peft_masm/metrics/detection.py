"""Point estimates of binary detection metrics (label 1 = fake = positive class).

Conventions (see ``docs/metrics.md``): accuracy counts ``score >= threshold`` as fake; EER is linearly
interpolated between ROC points; a video's score is the mean of its frames' scores, computed exactly
(``math.fsum``) so that it does not depend on the order of the frames. DeepfakeBench instead reads
EER off the nearest ROC point and counts ``score > threshold`` as fake.

Every metric is computed from one sorted pass over the scores (the same cumulative counts
scikit-learn's ``roc_curve`` / ``precision_recall_curve`` use), so the bootstrap can call them
thousands of times cheaply. ``tests/unit/test_metrics.py`` checks them against scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("auc", "eer", "ap", "acc")


def validate_inputs(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels, scores)`` as 1-D int/float arrays, or raise a ValueError that names the fix."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D; got shapes {y.shape} and {s.shape}. Flatten them first."
        )
    if y.shape[0] != s.shape[0]:
        raise ValueError(
            f"labels and scores differ in length ({y.shape[0]} vs {s.shape[0]}); pass one score per labelled frame."
        )
    if y.shape[0] == 0:
        raise ValueError(
            "labels and scores are empty; evaluate at least one real (0) and one fake (1) sample."
        )
    if not np.all(np.isfinite(s)):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise ValueError(f"scores contain {bad} NaN/inf value(s); check the model output before evaluating.")
    if y.dtype == bool:
        y = y.astype(np.int64)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(
            f"labels must be 0 (real) or 1 (fake); got values {sorted(values)}. Map them to 0/1."
        )
    if len(values) < 2:
        only = "real (0)" if values == {0} else "fake (1)"
        raise ValueError(
            f"labels contain only {only} samples; AUC, EER and AP need both classes. "
            "Evaluate on a set with real and fake samples."
        )
    return y.astype(np.int64), s


def binary_clf_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false/true positives at each distinct score, scores descending: ``(fps, tps, thresholds)``."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    y = labels[order]
    distinct = np.where(np.diff(s))[0]
    ends = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[ends].astype(np.float64)
    fps = (ends + 1 - tps).astype(np.float64)
    return fps, tps, s[ends]


def roc_from_counts(fps: np.ndarray, tps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` starting at (0, 0)."""
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC by the trapezoidal rule (as ``sklearn.metrics.roc_auc_score``)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate, linearly interpolated between the two ROC points where FNR - FPR changes sign.

    Reading the nearest ROC point instead (the field's habit) is biased by up to half a step.
    """
    diff = (1.0 - tpr) - fpr  # non-increasing along the curve: 1 at (0, 0), -1 at (1, 1)
    i = int(np.argmax(diff <= 0.0))
    if diff[i] == 0.0:
        return float(fpr[i])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def ap_from_counts(fps: np.ndarray, tps: np.ndarray) -> float:
    """Average precision: sum of precision times recall increments (as ``sklearn.metrics.average_precision_score``)."""
    recall = tps / tps[-1]
    precision = tps / (tps + fps)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def point_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, EER (interpolated), AP and accuracy of validated arrays.

    Accuracy counts ``score >= threshold`` as fake (DeepfakeBench uses ``>``: a score exactly at the
    threshold is fake here and real there).
    """
    fps, tps, _ = binary_clf_curve(labels, scores)
    fpr, tpr = roc_from_counts(fps, tps)
    acc = float(np.mean((scores >= threshold).astype(np.int64) == labels))
    return {
        "auc": auc_from_roc(fpr, tpr),
        "eer": eer_from_roc(fpr, tpr),
        "ap": ap_from_counts(fps, tps),
        "acc": acc,
    }


def group_by_video(
    labels: np.ndarray, scores: np.ndarray, video_ids: Sequence[object] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[str]]:
    """Video labels, video scores (mean frame probability), each video's frame indices, and the ids.

    Videos come in sorted id order. A video's score is ``math.fsum`` of its frame scores (exactly
    rounded, hence independent of frame order) divided by the frame count, so equal frame scores give
    bit-identical video scores however the frames are ordered.
    Raises ValueError if a video mixes real and fake frames or the ids do not match the frames.
    """
    ids = np.asarray([str(v) for v in video_ids])
    if ids.shape[0] != labels.shape[0]:
        raise ValueError(
            f"video_ids has {ids.shape[0]} entries but there are {labels.shape[0]} frames; pass one id per frame."
        )
    names, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    frames = np.split(order, np.cumsum(np.bincount(inverse, minlength=names.size))[:-1])
    v_labels = np.empty(names.size, dtype=np.int64)
    v_scores = np.empty(names.size, dtype=np.float64)
    for k, idx in enumerate(frames):
        frame_labels = labels[idx]
        if frame_labels.min() != frame_labels.max():
            raise ValueError(
                f"video {str(names[k])!r} has both real and fake frames; a video needs one label. "
                "Fix its labels or give its frames distinct video ids."
            )
        v_labels[k] = frame_labels[0]
        v_scores[k] = math.fsum(scores[idx].tolist()) / idx.size
    return v_labels, v_scores, frames, names.tolist()
