"""The cross-forgery benchmark's folds through compare.py (``benchmarks/cross_forgery.py``): which rates the
other folds reuse, and how the folds' runs are pooled into the table (run records written here, no training)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cross_forgery as folds  # noqa: E402

LABELS = [0] * 6 + [1] * 6


def _write_run(fold_dir: Path, method: str, stage: str, lr: float, seed: int, scores=None, val=0.5) -> None:
    record = {"method": method, "stage": stage, "learning_rate": lr, "seed": seed, "val_metric": val,
              "trainable": {"backbone": 10, "head": 2}, "seconds": 1.0}  # fmt: skip
    if scores is not None:
        record["test_scores"] = {folds.HELD_OUT: scores, folds.IN_DOMAIN: scores}
    path = fold_dir / "runs" / method / f"{stage}-lr{lr:g}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_the_other_folds_reuse_the_rate_best_on_the_sweep_folds_validation_on_average(tmp_path):
    # lora_r8's grid: 3e-4, 1e-3, 3e-3, 1e-2; blending prefers 1e-3, transfer 3e-3, the mean 3e-3
    val = {"blending": [0.5, 0.7, 0.6, 0.4], "transfer": [0.5, 0.5, 0.7, 0.4]}
    for fold, metrics in val.items():
        for lr, metric in zip((3e-4, 1e-3, 3e-3, 1e-2), metrics):
            _write_run(tmp_path / fold, "lora_r8", "sweep", lr, 0, val=metric)
    assert folds.chosen_rates(tmp_path, ["lora_r8"]) == {"lora_r8": 3e-3}
    with pytest.raises(SystemExit, match="full_ft's sweeps on blending, transfer are not finished"):
        folds.chosen_rates(tmp_path, ["full_ft"])


def test_fold_families_hold_out_one_group():
    train, test = folds.fold_families("blending")
    assert test == ["sbi", "seamless_swap"] and not set(train) & set(test) and "colour_swap" in train
    with pytest.raises(SystemExit, match="unknown mechanism group 'blend'"):
        folds.fold_families("blend")


def test_the_report_pools_the_folds_and_a_method_against_itself_differs_by_nothing(tmp_path):
    rng = np.random.default_rng(0)
    for fold in ("blending", "transfer"):
        fold_dir = tmp_path / fold
        items = {"labels": LABELS, "video_ids": [str(i) for i in range(len(LABELS))]}
        (fold_dir / "runs").mkdir(parents=True)
        (fold_dir / "test_items.json").write_text(json.dumps({folds.HELD_OUT: items, folds.IN_DOMAIN: items}))
        rows = [{"method": "masm_swept_w10"}, {"method": "lora_r8"}, {"method": "x", "noise_floor": True}]
        (fold_dir / "summary.json").write_text(json.dumps({"reference": "masm_swept_w10", "rows": rows}))
        for seed in (0, 1):
            perfect = [float(label) for label in LABELS]  # AUC 1
            _write_run(fold_dir, "lora_r8", "test", 1e-3, seed, perfect)
            _write_run(fold_dir, "masm_swept_w10", "test", 3e-3, seed, rng.random(len(LABELS)).tolist())
            _write_run(
                fold_dir, "masm_swept_w10", "noise", 3e-3, seed + 100, rng.random(len(LABELS)).tolist()
            )
    # a third seed on one fold only (a sweep fold runs 5 seeds, the others 3): the table pools the seeds all folds have
    _write_run(tmp_path / "blending", "lora_r8", "test", 1e-3, 2, [0.5] * len(LABELS))
    _write_run(tmp_path / "blending", "masm_swept_w10", "test", 3e-3, 2, [0.5] * len(LABELS))
    summary = folds.report(argparse.Namespace(out=tmp_path, n_bootstrap=200))
    assert summary["folds"] == ["blending", "transfer"] and summary["seeds"] == 2
    masm, lora, noise = summary["rows"]
    assert lora["held_out"] == {"blending": 1.0, "transfer": 1.0} and lora["seed_sd"] == 0.0
    assert lora["vs_reference"][0] == pytest.approx(1.0 - masm["held_out_mean"])
    assert lora["learning_rates"] == {"blending": 1e-3, "transfer": 1e-3}
    assert "vs_reference" not in masm and noise["method"] == "masm_swept_w10 (other seeds)"
    table = (tmp_path / "table.md").read_text()
    assert "| lora_r8 | 10 | 1.000 | 0.000 | 1.000 | 1.000 |" in table


def test_run_compares_each_fold_sweep_folds_first_and_pins_the_chosen_rates_on_the_others(
    tmp_path, monkeypatch
):
    for fold in folds.SWEEP_FOLDS:
        for lr, metric in zip((3e-4, 1e-3, 3e-3, 1e-2), (0.5, 0.6, 0.7, 0.4)):
            _write_run(tmp_path / fold, "lora_r8", "sweep", lr, 0, val=metric)
    calls = []
    monkeypatch.setattr(
        folds.subprocess, "run", lambda args: calls.append(args) or argparse.Namespace(returncode=0)
    )
    options = argparse.Namespace(folds="geometry,blending", methods="lora_r8", seeds=3, reference="lora_r8",
                                 out=tmp_path, backbone="clip-vit-b16")  # fmt: skip
    folds.run(options)
    blending, geometry = calls

    def option(args, name):
        return args[args.index(name) + 1]

    assert option(blending, "--test_families") == "sbi,seamless_swap" and "face_warp" in option(
        blending, "--train_families"
    )
    assert option(geometry, "--test_families") == "face_warp"
    assert "--learning_rates" not in blending  # a sweep fold chooses on its own validation split
    assert option(geometry, "--learning_rates") == "lora_r8=0.003"  # the best mean over the sweep folds
    assert (
        option(geometry, "--output_dir") == str(tmp_path / "geometry") and option(geometry, "--seeds") == "3"
    )
    assert option(blending, "--backbone") == option(geometry, "--backbone") == "clip-vit-b16"
    # a method the sweep folds have not swept cannot be pinned: the run stops before that fold
    options.methods = "lora_r8,linear_probe"
    with pytest.raises(SystemExit, match="linear_probe's sweeps on blending, transfer are not finished"):
        folds.run(argparse.Namespace(**{**vars(options), "folds": "geometry"}))
