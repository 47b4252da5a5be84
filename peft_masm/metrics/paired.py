"""Paired differences of AUC between two methods, with a bootstrap interval over seeds and test items.

Two methods are paired when they ran with the same seeds on the same test items: seed ``i`` of one against seed
``i`` of the other. A bootstrap draw resamples the seeds, and, within each test set, the items (stratified by
label); where a test set has videos (several frames each) it resamples whole videos, since the frames of one video
are not independent. The statistic is the mean over seeds (and, on average, over test sets) of the AUC difference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .detection import auc_from_roc, binary_clf_curve, roc_from_counts

__all__ = ["PairedScores", "PairedDifference", "frame_auc", "paired_difference"]


def frame_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` against 0/1 ``labels`` (NaN when one class is missing)."""
    if labels.min() == labels.max():
        return float("nan")
    return auc_from_roc(*roc_from_counts(*binary_clf_curve(labels, scores)[:2]))


@dataclass(frozen=True)
class PairedScores:
    """One test set scored by two methods over the same seeds: ``a`` and ``b`` are (seeds, items) arrays; ``units``
    gives each item's resampling unit (its video, or the item itself)."""

    labels: np.ndarray
    a: np.ndarray
    b: np.ndarray
    units: np.ndarray

    def __post_init__(self) -> None:
        if self.a.shape != self.b.shape or self.a.shape[1] != self.labels.shape[0]:
            raise ValueError(f"paired scores need equal shapes: a {self.a.shape}, b {self.b.shape}, "
                             f"labels {self.labels.shape}")  # fmt: skip

    def difference(self, seed_picks: np.ndarray, items: np.ndarray | None = None) -> float:
        """Mean over ``seed_picks`` of AUC(a) - AUC(b) on ``items`` (all items when None)."""
        idx = slice(None) if items is None else items
        y = self.labels[idx]
        return float(
            np.mean([frame_auc(y, self.a[s][idx]) - frame_auc(y, self.b[s][idx]) for s in seed_picks])
        )

    @functools.cached_property
    def _units_by_label(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each unit's item indices, and the units of each label (0, 1)."""
        _, first, inverse = np.unique(self.units, return_index=True, return_inverse=True)
        members = np.split(np.argsort(inverse, kind="mergesort"), np.cumsum(np.bincount(inverse))[:-1])
        unit_labels = self.labels[first]
        return members, [np.flatnonzero(unit_labels == label) for label in (0, 1)]

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Item indices of one bootstrap draw: units resampled with replacement within each label."""
        members, pools = self._units_by_label
        return np.concatenate([members[u] for pool in pools for u in rng.choice(pool, size=pool.size)])


@dataclass(frozen=True)
class PairedDifference:
    """A paired difference (mean over seeds and sets) with its 95 % bootstrap interval."""

    point: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def paired_difference(
    sets: Sequence[PairedScores], n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> PairedDifference:
    """The mean over ``sets`` of the paired AUC difference, with a percentile bootstrap interval whose draws
    resample the seeds once (the same seeds for every set) and the items of each set."""
    n_seeds = sets[0].a.shape[0]
    all_seeds = np.arange(n_seeds)
    point = float(np.mean([s.difference(all_seeds) for s in sets]))
    if n_bootstrap == 0:
        return PairedDifference(point, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        picks = rng.integers(n_seeds, size=n_seeds)
        draws.append(np.mean([s.difference(picks, s.resample(rng)) for s in sets]))
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.nanpercentile(draws, [tail, 100.0 - tail])
    return PairedDifference(point, float(low), float(high))
