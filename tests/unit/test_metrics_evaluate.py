"""The packaged `evaluate` module loads by path, offline, and agrees with scikit-learn and compute_detection_metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from peft_masm.metrics import EVALUATE_MODULE_DIR, compute_detection_metrics, load_metric


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluate.config
    import huggingface_hub.constants

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _data(seed: int = 0, n_videos: int = 30, frames: int = 4) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    v_labels = rng.integers(0, 2, n_videos)
    v_labels[:2] = [0, 1]
    labels = np.repeat(v_labels, frames)
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=labels.size) + labels - 0.5)))
    ids = [f"v{i}" for i in np.repeat(np.arange(n_videos), frames)]
    return labels, scores, ids


def test_module_file_is_where_evaluate_looks() -> None:
    assert (EVALUATE_MODULE_DIR / f"{EVALUATE_MODULE_DIR.name}.py").is_file()


def test_frame_config_matches_sklearn_and_function() -> None:
    labels, scores, _ = _data()
    metric = load_metric()
    out = metric.compute(predictions=scores.tolist(), references=labels.tolist(), n_bootstrap=100, seed=3)
    assert out["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["frame_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out == compute_detection_metrics(labels, scores, n_bootstrap=100, seed=3)


def test_video_config_with_batches_matches_function() -> None:
    labels, scores, ids = _data(1)
    metric = load_metric("video")
    half = len(ids) // 2
    metric.add_batch(predictions=scores[:half], references=labels[:half], video_ids=ids[:half])
    metric.add_batch(predictions=scores[half:], references=labels[half:], video_ids=ids[half:])
    out = metric.compute(n_bootstrap=50)
    v_scores = scores.reshape(-1, 4).mean(axis=1)
    assert out["video_auc"] == pytest.approx(roc_auc_score(labels[::4], v_scores), abs=1e-12)
    assert out == compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=50)


def test_load_by_file_path() -> None:
    import evaluate

    labels, scores, _ = _data(3)
    metric = evaluate.load(str(EVALUATE_MODULE_DIR / "masm_detection.py"))
    out = metric.compute(predictions=scores, references=labels, n_bootstrap=0)
    assert out["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_unknown_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown configuration 'clip'"):
        load_metric("clip")


def test_evaluate_load_by_path_in_fresh_offline_process(tmp_path) -> None:
    """`evaluate.load(<dir>)` in a clean interpreter with HF_HUB_OFFLINE=1 and empty caches."""
    labels, scores, _ = _data(2)
    code = (
        "import evaluate, json, sys\n"
        f"m = evaluate.load({str(EVALUATE_MODULE_DIR)!r})\n"
        "d = json.loads(sys.argv[1])\n"
        "print(json.dumps(m.compute(predictions=d['s'], references=d['y'], n_bootstrap=0)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_MODULES_CACHE", None)
    arg = json.dumps({"s": scores.tolist(), "y": labels.tolist()})
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert (tmp_path / "hf" / "modules").is_dir()  # the module was copied into the fresh cache, not fetched
