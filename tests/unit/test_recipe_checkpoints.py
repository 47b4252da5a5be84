"""peft_masm.recipe.checkpoints: which files --overwrite_output_dir may remove, which run a checkpoint belongs to,
checkpoints written whole and rotated, where a resume starts (no training: a stand-in Accelerator)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from recipe_fixtures import earlier_run, write_config

from peft_masm.recipe.checkpoints import (
    CheckpointMismatchError,
    OutputDirError,
    TrainState,
    interrupted_message,
    list_checkpoints,
    outputs_to_replace,
    remove_outputs,
    resolve_resume,
    run_hash,
    save_checkpoint,
)
from peft_masm.recipe.config import load_config
from peft_masm.tuner.step_hooks import StepState


class _Accelerator:
    """What save_checkpoint needs of an Accelerator, on one process; ``interrupt`` sends Ctrl-C mid-save."""

    is_main_process = True

    def __init__(self, interrupt: bool = False) -> None:
        self.interrupt = interrupt

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "optimizer.bin").write_bytes(b"first half")
        if self.interrupt:
            os.kill(os.getpid(), signal.SIGINT)
        (Path(folder) / "random_states_0.pkl").write_bytes(b"second half")


def _state(step: int) -> TrainState:
    state = TrainState()
    state.steps = StepState()
    state.steps.num_steps = step
    return state


def test_train_state_reads_the_training_steps_count_and_saves_without_it():
    state = _state(7)
    assert state.global_step == 7
    assert "steps" not in state.state_dict() and state.state_dict()["epoch"] == 0
    assert TrainState().global_step == 0


def test_checkpoint_rotation_keeps_only_this_runs_checkpoints(tmp_path):
    cfg = load_config(None, ["--output_dir", str(tmp_path)])
    mine, other = run_hash(cfg), "f" * 16
    for step, run in ((10, other), (12, other), (2, mine), (4, mine)):
        folder = Path(tmp_path) / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(json.dumps({"hash": run}))
    found = list_checkpoints(Path(tmp_path) / "checkpoints", only_hash=mine)
    assert [p.name for p in found] == ["step_2", "step_4"]
    for step in (
        6,
        8,
    ):  # checkpoints_total_limit: 2 (the default) removes this run's oldest, not the other run's
        save_checkpoint(_Accelerator(), _state(step), cfg)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_10", "step_12", "step_6", "step_8"]


def test_resume_latest_is_the_newest_checkpoint_and_must_belong_to_this_configuration(tmp_path):
    cfg = load_config(None, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert resolve_resume(cfg, print) is None  # nothing yet: starts from scratch
    for step in (3, 5):
        save_checkpoint(_Accelerator(), _state(step), cfg)
    assert resolve_resume(cfg, print) == tmp_path / "checkpoints" / "step_5"
    with pytest.warns(UserWarning, match="resuming with learning_rate"):  # allowed to change, with a warning
        resolve_resume(load_config(None, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest",
                                          "--learning_rate", "1e-3"]), print)  # fmt: skip
    other = load_config(
        None, ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest", "--seed", "7"]
    )
    with pytest.raises(CheckpointMismatchError, match="another configuration \\(seed: 42 -> 7\\)"):
        resolve_resume(other, print)


def test_a_non_empty_output_dir_is_refused_without_overwrite(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(OutputDirError, match="already holds files"):
        outputs_to_replace(load_config(None, ["--output_dir", str(tmp_path)]))
    assert outputs_to_replace(load_config(None, ["--output_dir", str(tmp_path / "new")])) == []


def test_overwrite_output_dir_removes_only_the_earlier_runs_files(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", out)
    earlier_run(out, cfg)
    (out / "checkpoints" / ".tmp-step_7").mkdir()  # a save that never finished
    (out / "checkpoints" / ".tmp-step_7" / "optimizer.bin").write_bytes(b"x")
    (out / "empty-folder").mkdir()
    legacy = out / "checkpoints" / "step_3"  # a checkpoint from before run files listed their files
    legacy.mkdir()
    (legacy / "run_config.json").write_text('{"hash": "0123456789abcdef"}')
    (legacy / "scheduler.bin").write_bytes(b"x")
    found = outputs_to_replace(load_config(cfg, ["--overwrite_output_dir"]))
    assert sorted(p.name for p in found) == ["adapter", "checkpoints", "metrics.jsonl"]
    remove_outputs(found)
    assert sorted(p.name for p in out.iterdir()) == ["empty-folder"]
    (legacy.parent).mkdir()
    legacy.mkdir()
    (legacy / "run_config.json").write_text('{"hash": "0123456789abcdef"}')
    (legacy / "mine.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="step_3/mine.txt was not written by this recipe"):
        outputs_to_replace(load_config(cfg, ["--overwrite_output_dir"]))


def test_ctrl_c_during_a_checkpoint_save_waits_for_the_complete_checkpoint(tmp_path):
    """Issue 26.9: nothing half-written: Ctrl-C is held until the checkpoint is renamed into place."""
    cfg = load_config(None, ["--output_dir", str(tmp_path)])
    state = _state(4)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_Accelerator(interrupt=True), state, cfg)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_4"]
    run = json.loads((root / "step_4" / "run_config.json").read_text())
    assert run["files"] == ["optimizer.bin", "random_states_0.pkl"]
    assert (root / "step_4" / "random_states_0.pkl").read_bytes() == b"second half"
    assert interrupted_message(cfg, state) == (
        "interrupted at step 4; resume with --resume_from_checkpoint latest (from checkpoint step_4)"
    )
