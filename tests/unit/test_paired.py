"""Paired AUC differences with a bootstrap over seeds and test items (``peft_masm.metrics.paired``)."""

from __future__ import annotations

import numpy as np
import pytest

from peft_masm.metrics.paired import PairedScores, frame_auc, paired_difference


def _scores(rng: np.random.Generator, labels: np.ndarray, signal: float, seeds: int = 3) -> np.ndarray:
    return rng.random((seeds, labels.size)) + signal * labels


def test_frame_auc_matches_sklearn_and_is_nan_for_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 200), rng.random(200).round(2)  # ties count one half
    assert frame_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(frame_auc(np.ones(5, dtype=int), rng.random(5)))


def test_a_method_against_itself_differs_by_exactly_zero():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    a = _scores(rng, labels, 0.3)
    result = paired_difference([PairedScores(labels, a, a.copy(), np.arange(300))], n_bootstrap=200)
    assert (result.point, result.low, result.high) == (0.0, 0.0, 0.0)


def test_a_clearly_better_method_has_an_interval_above_zero_and_the_point_inside():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    better = PairedScores(labels, _scores(rng, labels, 0.8), _scores(rng, labels, 0.1), np.arange(400))
    result = paired_difference([better], n_bootstrap=300)
    assert result.low > 0 and result.low <= result.point <= result.high and result.excludes_zero()
    assert result.point == pytest.approx(np.mean([frame_auc(labels, better.a[s]) - frame_auc(labels, better.b[s])
                                                  for s in range(3)]))  # fmt: skip


def test_videos_are_resampled_whole_and_classes_keep_their_size():
    labels = np.repeat([0, 1, 0, 1], 5)  # four videos of five frames
    units = np.repeat(["r1", "f1", "r2", "f2"], 5)
    paired = PairedScores(labels, np.zeros((1, 20)), np.zeros((1, 20)), units)
    rng = np.random.default_rng(3)
    for _ in range(20):
        idx = paired.resample(rng)
        assert idx.size == 20 and labels[idx].sum() == 10  # two real and two fake videos, always
        for start in range(0, 20, 5):  # each drawn video comes with all its frames, in one block
            block = idx[start : start + 5]
            assert len(set(units[block])) == 1 and sorted(block) == list(range(block[0], block[0] + 5))


def test_seeds_are_resampled_the_same_way_for_every_test_set():
    # set 1: a beats b only at seed 0; set 2: a beats b only at seed 0 as well. If the seed draws were
    # independent per set, the average could mix seed 0 of one set with seed 1 of the other.
    labels = np.array([0, 0, 1, 1])
    good, bad = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.9, 0.8, 0.2, 0.1])
    a, b = np.stack([good, bad]), np.stack([bad, bad])
    sets = [PairedScores(labels, a, b, np.arange(4)) for _ in range(2)]
    result = paired_difference(sets, n_bootstrap=200)
    assert result.point == pytest.approx(0.5)
    draws = {round(paired_difference(sets, n_bootstrap=1, seed=s).low, 6) for s in range(40)}
    assert draws <= {0.0, 0.5, 1.0}  # 0, 1 or 2 picks of seed 0, the same for both sets


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="equal shapes"):
        PairedScores(np.zeros(3), np.zeros((2, 3)), np.zeros((1, 3)), np.arange(3))
