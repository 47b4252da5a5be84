"""peft_masm.metrics against scikit-learn and an independent EER interpolation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from peft_masm.metrics import compute_detection_metrics, plot_roc, results_markdown, write_results

METRICS = ("auc", "eer", "ap", "acc")


def _random_scores(seed: int, n: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.2 * labels - 0.6)))
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


def _reference_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """The textbook EER: the root of 1 - x - TPR(x) on scikit-learn's linearly interpolated ROC."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-14))


def _nearest_point_eer(labels: np.ndarray, scores: np.ndarray) -> float:
    """The field's habit (DeepfakeBench): FNR at the ROC point where |FNR - FPR| is smallest."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    return float(fnr[np.nanargmin(np.abs(fnr - fpr))])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_frame_metrics_match_sklearn(seed: int, ties: bool) -> None:
    labels, scores = _random_scores(seed, 50 + 97 * seed, ties)
    out = compute_detection_metrics(labels, scores, n_bootstrap=0)
    assert out["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["frame_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["frame_acc"] == pytest.approx(accuracy_score(labels, scores >= 0.5), abs=1e-12)
    assert out["frame_eer"] == pytest.approx(_reference_eer(labels, scores), abs=1e-9)
    assert "frame_auc_ci" not in out and "bootstrap" not in out


def test_eer_is_interpolated_not_nearest_point() -> None:
    # 3 real, 2 fake: the ROC jumps in steps of 1/3 and 1/2, so no ROC point has FNR == FPR.
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.3, 0.5, 0.9])
    out = compute_detection_metrics(labels, scores, n_bootstrap=0)
    assert out["frame_eer"] == pytest.approx(_reference_eer(labels, scores), abs=1e-12)
    # The crossing lies between (fpr 0, tpr 0.5) and (fpr 1/3, tpr 0.5): FNR = 0.5 stays, FPR rises to 1/3.
    assert out["frame_eer"] == pytest.approx(1 / 3, abs=1e-12)
    assert out["frame_eer"] != pytest.approx(_nearest_point_eer(labels, scores))


def test_threshold_changes_accuracy_only() -> None:
    labels, scores = _random_scores(3, 300)
    a = compute_detection_metrics(labels, scores, threshold=0.5, n_bootstrap=0)
    b = compute_detection_metrics(labels, scores, threshold=0.8, n_bootstrap=0)
    assert b["frame_acc"] == pytest.approx(accuracy_score(labels, scores >= 0.8))
    assert a["frame_acc"] != b["frame_acc"]
    assert a["frame_auc"] == b["frame_auc"] and b["threshold"] == 0.8


def _videos(seed: int, n_videos: int, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    video_labels = rng.integers(0, 2, n_videos)
    video_labels[:2] = [0, 1]
    ids = np.repeat([f"vid{i:03d}" for i in range(n_videos)], frames)
    labels = np.repeat(video_labels, frames)
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=labels.size) + labels - 0.5)))
    return labels, scores, ids


def test_video_metrics_use_mean_frame_probability() -> None:
    labels, scores, ids = _videos(1, 40, 8)
    out = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=0)
    v_labels = labels[::8]
    v_scores = scores.reshape(40, 8).mean(axis=1)
    assert out["n_videos"] == 40 and out["n_frames"] == 320
    assert out["video_auc"] == pytest.approx(roc_auc_score(v_labels, v_scores), abs=1e-12)
    assert out["video_ap"] == pytest.approx(average_precision_score(v_labels, v_scores), abs=1e-12)
    assert out["video_acc"] == pytest.approx(accuracy_score(v_labels, v_scores >= 0.5), abs=1e-12)
    assert out["video_eer"] == pytest.approx(_reference_eer(v_labels, v_scores), abs=1e-9)
    assert out["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_video_grouping_ignores_frame_order() -> None:
    labels, scores, ids = _videos(2, 30, 5)
    perm = np.random.default_rng(0).permutation(labels.size)
    a = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=0)
    b = compute_detection_metrics(labels[perm], scores[perm], video_ids=ids[perm], n_bootstrap=0)
    assert a["video_auc"] == pytest.approx(b["video_auc"]) and a["video_eer"] == pytest.approx(b["video_eer"])


def test_bootstrap_interval_contains_point_estimate() -> None:
    labels, scores = _random_scores(4, 400)
    out = compute_detection_metrics(labels, scores, n_bootstrap=300, seed=1)
    for name in METRICS:
        low, high = out[f"frame_{name}_ci"]
        assert low <= out[f"frame_{name}"] <= high, name
        assert high - low > 0, name
    assert out["bootstrap"]["n_used"] == {"frame": 300}
    assert out["bootstrap"]["resampled_unit"] == "frame"


def test_video_bootstrap_resamples_videos_and_is_seeded() -> None:
    labels, scores, ids = _videos(5, 60, 4)
    a = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=200, seed=7)
    b = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=200, seed=7)
    assert a == b
    assert a["bootstrap"]["resampled_unit"] == "video"
    for level in ("frame", "video"):
        for name in METRICS:
            low, high = a[f"{level}_{name}_ci"]
            assert low <= a[f"{level}_{name}"] <= high, (level, name)


def test_bootstrap_skips_single_class_resamples_and_counts_them() -> None:
    # 1 fake among 6 samples: about (5/6)^6 = 33% of resamples have no fake and must be skipped.
    labels = np.array([0, 0, 0, 0, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    out = compute_detection_metrics(labels, scores, n_bootstrap=500, seed=0)
    used = out["bootstrap"]["n_used"]["frame"]
    assert 250 < used < 420
    assert out["bootstrap"]["n_requested"] == 500


@pytest.mark.parametrize(
    ("labels", "scores", "video_ids", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], None, "differ in length"),
        ([1, 1, 1], [0.1, 0.2, 0.3], None, "only fake"),
        ([0, 0], [0.1, 0.2], None, "only real"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], None, "NaN"),
        ([0, 1, 2], [0.1, 0.2, 0.3], None, r"0 \(real\) or 1 \(fake\)"),
        ([], [], None, "empty"),
        ([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], ["a", "a", "b", "b"], "video 'a' has both real and fake"),
        ([0, 1], [0.1, 0.2], ["a"], "one id per frame"),
        ([0, 1], [0.1, float("inf")], None, "NaN/inf"),
    ],
)
def test_bad_input_raises_clear_error(labels, scores, video_ids, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_detection_metrics(labels, scores, video_ids=video_ids, n_bootstrap=0)


def test_write_results_json_and_markdown(tmp_path) -> None:
    labels, scores, ids = _videos(6, 20, 3)
    results = {
        "held-out families": compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=50),
        "frames only": compute_detection_metrics(labels, scores, n_bootstrap=0),
    }
    json_path, md_path = write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    md = md_path.read_text()
    assert md == results_markdown(results)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[1:3] == ["frame_auc", "frame_eer"]
    assert f"{results['held-out families']['video_auc']:.4f} [" in rows[1]
    assert rows[2].endswith("| – | – | – | – |")  # no video metrics for the frames-only set
    with pytest.raises(ValueError, match="empty"):
        write_results({}, tmp_path)


def test_write_results_is_strict_json_when_no_resample_was_usable(tmp_path) -> None:
    # Two samples, one bootstrap resample: half the seeds draw a single class, leaving no usable resample.
    runs = (compute_detection_metrics([0, 1], [0.2, 0.7], n_bootstrap=1, seed=seed) for seed in range(20))
    out = next(r for r in runs if r["bootstrap"]["n_used"]["frame"] == 0)
    json_path, md_path = write_results({"tiny": out}, tmp_path)
    loaded = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded["tiny"]["frame_auc_ci"] == [None, None]
    assert "| tiny | 1.0000 |" in md_path.read_text()


def test_plot_roc_writes_png(tmp_path) -> None:
    a = _random_scores(0, 100)
    b = _random_scores(1, 80)
    path = plot_roc({"set A": a, "set B": b}, tmp_path / "plots" / "roc.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="only real"):
        plot_roc({"bad": ([0, 0], [0.1, 0.2])}, tmp_path / "bad.png")


def test_equal_frame_scores_give_equal_video_scores_whatever_the_order() -> None:
    # 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in float64: a plain running sum would rank these apart.
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.3, 0.2, 0.1, 0.1, 0.2, 0.3])
    ids = ["real", "real", "real", "fake", "fake", "fake"]
    out = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=0)
    assert out["video_auc"] == 0.5  # the two videos tie exactly


def test_video_metrics_bit_identical_under_frame_permutation() -> None:
    labels, scores, ids = _videos(4, 60, 7)
    scores = np.round(scores, 1)  # many equal frame scores, so video scores tie across videos
    a = compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=20)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(labels.size)
        b = compute_detection_metrics(labels[perm], scores[perm], video_ids=ids[perm], n_bootstrap=20)
        for key in ("video_auc", "video_eer", "video_ap", "video_acc", "video_auc_ci"):
            assert a[key] == b[key], key
