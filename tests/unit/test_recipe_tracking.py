"""peft_masm.recipe.tracking: the JSONL tracker (metrics.jsonl, run_config.json) and report_to's trackers."""

from __future__ import annotations

import json

import torch
from accelerate.tracking import GeneralTracker

from peft_masm.recipe.config import load_config
from peft_masm.recipe.tracking import JSONLTracker, make_trackers


def test_jsonl_tracker_writes_one_row_per_log_call_and_the_configuration(tmp_path):
    tracker = JSONLTracker("masm", tmp_path / "out")
    assert isinstance(tracker, GeneralTracker) and tracker.tracker == tmp_path / "out" / "metrics.jsonl"
    tracker.store_init_configuration({"epochs": 3, "backbone": "clip-vit-b16"})
    tracker.log({"train/loss": torch.tensor(0.5), "epoch": 0, "note": "x"}, step=1)
    tracker.log({"val/auc": 0.75}, step=2)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 0.5, "epoch": 0.0, "note": "x"}, {"step": 2, "val/auc": 0.75}]
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["epochs"] == 3


def test_report_to_names_become_trackers(tmp_path):
    cfg = load_config(None, ["--output_dir", str(tmp_path), "--report_to", "json,none"])
    trackers = make_trackers(cfg.report_to, cfg.output_dir)
    assert len(trackers) == 1 and isinstance(trackers[0], JSONLTracker)
    assert make_trackers(["none"], str(tmp_path)) == []
