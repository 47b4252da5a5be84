"""Scoring datasets with a detector and writing results (JSON, Markdown table, ROC plot).

The prediction and scoring path of ``recipes/train.py`` (validation each epoch, test sets at the end),
``recipes/evaluate_detector.py`` and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.processing import collate
from .detector import forward_logits
from .metrics import compute_detection_metrics, plot_roc, write_results

__all__ = ["face_cropper", "predict", "score_sets", "metrics_for"]


def _model_of(model: Any) -> torch.nn.Module:
    """The model to run: a ``MASMDetector``'s own, or ``model`` itself."""
    from .detector import MASMDetector

    return model.model if isinstance(model, MASMDetector) else model


def face_cropper(detector: Any, face_detector: str = "auto") -> Any:
    """The face crop a saved detector was trained on: size and margin from its ``detector_config.json``.

    ``detector`` is a :class:`~peft_masm.detector.MASMDetector` or the folder it was saved in.
    """
    from .detector import DetectorConfig, MASMDetector

    config = (
        detector.config if isinstance(detector, MASMDetector) else DetectorConfig.from_pretrained(detector)
    )
    return config.face_cropper(face_detector)


@torch.no_grad()
def predict(
    model: torch.nn.Module, ds: Any, batch_size: int, accelerator: Any = None, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """``(labels, fake probabilities, video ids, mean cross-entropy)`` over ``ds``.

    ``model`` is a detector's model or a :class:`~peft_masm.detector.MASMDetector`. With ``accelerator`` the set is
    sharded over processes and gathered (each sample counted once).
    """
    model = _model_of(model)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    was_training = model.training
    model.eval()
    labels, scores, vids, losses = [], [], [], []
    index = 0
    for batch in loader:
        logits = forward_logits(model, batch["pixel_values"]).float()
        y = batch["labels"]
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        prob = torch.softmax(logits, dim=-1)[:, 1]
        if accelerator is not None:
            prob, y, loss = accelerator.gather_for_metrics((prob, y, loss))
            vids += [str(index + i) for i in range(len(y))]  # video ids cannot be gathered as strings
        else:
            vids += batch["video_id"]
        index += len(y)
        labels.append(y.cpu())
        scores.append(prob.cpu())
        losses.append(loss.cpu())
    model.train(was_training)
    if not labels:
        raise ValueError(f"{desc or 'the dataset'} is empty; nothing to evaluate.")
    return (torch.cat(labels).numpy(), torch.cat(scores).numpy(), vids, float(torch.cat(losses).mean()))


def metrics_for(
    labels: np.ndarray, scores: np.ndarray, video_ids: list[str], n_bootstrap: int, seed: int = 0
) -> dict[str, Any]:
    """Frame metrics, plus video metrics when some video contributes several frames."""
    several = len(set(video_ids)) < len(video_ids)
    return compute_detection_metrics(
        labels, scores, video_ids=video_ids if several else None, n_bootstrap=n_bootstrap, seed=seed
    )


def score_sets(
    model: torch.nn.Module,
    sets: dict[str, Any],
    out_dir: str | Path,
    batch_size: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    log: Any = print,
    subsets: dict[str, tuple[str, list[int]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate every named set; write ``results.json``, ``results.md`` and ``roc.png`` into ``out_dir``.

    ``subsets`` maps a result name to ``(set name, row indices)``: metrics on those rows of a scored set,
    without scoring the images again. ``model`` may be a :class:`~peft_masm.detector.MASMDetector`.
    """
    model = _model_of(model)
    results: dict[str, dict[str, Any]] = {}
    curves = {}
    scored = {}
    for name, ds in sets.items():
        scored[name] = labels, scores, vids, _ = predict(model, ds, batch_size, desc=f"test set {name!r}")
        results[name] = metrics_for(labels, scores, vids, n_bootstrap, seed)
        curves[name] = (labels, scores)
        log(f"  {name}: frame AUC {results[name]['frame_auc']:.4f} ({len(labels)} images)")
    for name, (parent, rows) in (subsets or {}).items():
        labels, scores, vids, _ = scored[parent]
        idx = np.asarray(rows, dtype=np.int64)
        results[name] = metrics_for(labels[idx], scores[idx], [vids[i] for i in idx], n_bootstrap, seed)
        curves[name] = (labels[idx], scores[idx])
        log(f"  {name}: frame AUC {results[name]['frame_auc']:.4f} ({len(idx)} images)")
    out = Path(out_dir)
    write_results(results, out)
    plot_roc(curves, out / "roc.png", title="ROC on the test sets")
    return results
