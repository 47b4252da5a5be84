"""`evaluate` module for deepfake detection: frame/video AUC, EER (interpolated), AP, accuracy + bootstrap CIs.

Load it by path, no Hub needed: ``evaluate.load(<this folder>)`` or ``peft_masm.metrics.load_metric()``.
"""

from __future__ import annotations

import datasets
import evaluate

from peft_masm.metrics.compute import compute_detection_metrics

_CITATION = ""

_DESCRIPTION = """\
Binary deepfake-detection metrics (label 1 = fake, the positive class): ROC AUC, equal error rate
interpolated on the ROC, average precision and accuracy at a threshold, each with a percentile
bootstrap 95% interval. With the "video" configuration a `video_ids` input groups frames into videos:
a video's score is the mean of its frames' probabilities, and the bootstrap resamples videos.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): fake probability per frame.
    references (`list` of `int`): 0 (real) or 1 (fake) per frame.
    video_ids (`list` of `str`, "video" configuration only): the video each frame belongs to.
    threshold (`float`, default 0.5): accuracy counts `prediction >= threshold` as fake.
    n_bootstrap (`int`, default 1000): bootstrap resamples; 0 disables the intervals.
    seed (`int`, default 0): seed of the bootstrap.
Returns:
    `frame_auc`, `frame_eer`, `frame_ap`, `frame_acc` (+ `video_*` with video_ids), each with a
    `<name>_ci` [low, high] entry, counts, and a `bootstrap` entry saying how many resamples were used.
Examples:
    >>> metric = evaluate.load("path/to/masm_detection")
    >>> metric.compute(predictions=[0.1, 0.9, 0.4, 0.7], references=[0, 1, 0, 1], n_bootstrap=0)["frame_auc"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MasmDetection(evaluate.Metric):
    """Frame- and video-level detection metrics of peft_masm."""

    def _info(self) -> evaluate.MetricInfo:
        features = {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
        if self.config_name == "video":
            features["video_ids"] = datasets.Value("string")
        elif self.config_name != "default":
            raise ValueError(f"unknown configuration {self.config_name!r}; use 'default' or 'video'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#roc-metrics"],
        )

    def _compute(
        self,
        predictions: list[float],
        references: list[int],
        video_ids: list[str] | None = None,
        threshold: float = 0.5,
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> dict:
        return compute_detection_metrics(
            references,
            predictions,
            video_ids=video_ids,
            threshold=threshold,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
