"""recipes/train.py as a user meets it: --help, a missing --config, clean one-line errors, a reused output_dir,
a checkpoint of another run. None of these trains (each fails or exits before the first step)."""

from __future__ import annotations

import json
import subprocess

import pytest
from recipe_fixtures import PYTHON, RECIPES, earlier_run, env, write_config

TRAIN = str(RECIPES / "train.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, TRAIN, *args], capture_output=True, text=True, timeout=240, env=env())


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_with_type_default_and_help(flag):
    from dataclasses import fields

    from peft_masm.recipe.config import TrainConfig

    result = _run(flag)
    assert result.returncode == 0, result.stderr
    for f in fields(TrainConfig):
        if f.init:  # not `adapter`: the masm: / lora: section as its config object
            assert f"--{f.name} " in result.stdout, f.name
            assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "(default: 'clip-vit-b16')" in result.stdout
    assert "--learning_rate float" in result.stdout


def test_without_config_prints_usage_and_fails():
    result = _run()
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--config is required" in result.stderr


def test_bad_adapter_value_is_one_line_before_anything_loads(tmp_path):
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", tmp_path / "out"
    )
    result = _run("--config", str(cfg), "--masm.layer_mask", "dynamc")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: masm: MASMConfig.layer_mask='dynamc' is not one of ['dynamic', 'static', 'none']."
    ]


def test_a_finished_run_in_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "results.json").write_text('{"old": 1}')
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", out)
    result = _run("--config", str(cfg))
    assert result.returncode == 2
    assert "already holds files" in result.stderr and "--overwrite_output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "results.json").read_text() == '{"old": 1}'


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step_12"
    ckpt.mkdir(parents=True)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", out)
    from peft_masm.recipe.config import load_config

    identity = {**load_config(cfg).run_identity(), "seed": 7}
    (ckpt / "run_config.json").write_text(json.dumps({"hash": "0" * 16, "identity": identity}))
    result = _run("--config", str(cfg), "--resume_from_checkpoint", "latest")
    assert result.returncode == 2
    assert "belongs to a run with another configuration" in result.stderr
    assert "seed: 7 -> 0" in result.stderr
    assert ckpt.is_dir()


def test_evaluate_detector_help_explains_every_option():
    script = str(RECIPES / "evaluate_detector.py")
    result = subprocess.run(
        [PYTHON, script, "--help"], capture_output=True, text=True, timeout=120, env=env()
    )
    assert result.returncode == 0, result.stderr
    for text in ("FaceForensics++ compression level", "dataset key inside a DeepfakeBench JSON",
                 "evenly spaced frames per video", "bootstrap resamples", "scoring batch size",
                 "seed of the bootstrap", "(default: c23)"):  # fmt: skip
        assert text in " ".join(result.stdout.split()), text


def test_an_empty_config_is_one_line_and_exit_2(tmp_path):
    """Issue 26.2: an all-comment YAML used to start the default run (CLIP B/16, 10 epochs) silently."""
    empty = tmp_path / "e.yaml"
    empty.write_text("# to do: fill in\n")
    result = _run("--config", str(empty), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {empty} is empty (or only comments): nothing says what to train. Start from a config in "
        "recipes/configs/ (demo.yaml runs offline in minutes)."
    ]
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_is_not_installed_is_refused_at_start(tmp_path):
    """Issue 26.10: a missing tracker used to be dropped with a warning lost in the progress bar."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    missing = [t.value for t in LoggerType if t.value != "all" and t not in get_available_trackers()]
    if not missing:
        pytest.skip("every tracker accelerate knows is installed here")
    name = "tensorboard" if "tensorboard" in missing else missing[0]
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", tmp_path / "out"
    )
    result = _run("--config", str(cfg), "--report_to", f"json,{name}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: report_to: {name} is not installed; `pip install {name}`, or log without it (--report_to json)."
    ]


@pytest.mark.parametrize(
    "where", ["checkpoints/step_5/mine.txt", "adapter/notes.md", "mine.txt", "plots/roc.svg"]
)
def test_overwrite_output_dir_stops_at_a_file_the_recipe_did_not_write(tmp_path, where):
    """Issue 26.3: --overwrite_output_dir removed OUT/checkpoints/step_5/mine.txt without a word."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "no-backbone", tmp_path / "no-data", out)
    kept = earlier_run(out, cfg)
    mine = out / where
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("my notes")
    result = _run("--config", str(cfg), "--overwrite_output_dir")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output_dir: {mine} was not written by this recipe, so --overwrite_output_dir stops here and "
        "deletes nothing. Move that file away, or choose another --output_dir."
    ]
    assert mine.read_text() == "my notes"
    assert all(path.is_file() for path in kept)
