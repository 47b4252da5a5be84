"""End to end at tiny size: train (accelerate), evaluate, masm-detect; two processes; resume; bad input.

The model is a tiny random CLIP and the data tiny synthetic image folders, both made by the tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from recipe_fixtures import (
    ACCELERATE,
    PYTHON,
    RECIPES,
    env,
    make_image_folder,
    save_tiny_clip,
    write_config,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return save_tiny_clip(root / "clip"), make_image_folder(root / "data")


def _run(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env())


def _launch(processes: int = 1) -> list[str]:
    if processes == 1:
        launch = [ACCELERATE, "launch", "--cpu", "--num_processes", "1"]
    else:  # several CPU processes: torch's launcher + Accelerator(cpu=True) (accelerate's --cpu needs mpirun)
        launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes)]
    return [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _train(cfg: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    if processes > 1:
        extra = (*extra, "--cpu", "true")
    result = _run([*_launch(processes), str(RECIPES / "train.py"), "--config", str(cfg), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _val_lines(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/auc" in r]


def test_train_evaluate_detect(assets, tmp_path):
    clip, data = assets
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, out)
    result = _train(cfg)
    assert "adapter (best on validation, with model card)" in result.stdout
    adapter = out / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "training_config.yaml",
        "preprocessor_config.json",
    ):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(clip)
    # the model card train.py wrote parses, with metadata and the test results
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(clip)
    assert "masm" in card.data.tags
    assert card.data.eval_results and {r.dataset_name for r in card.data.eval_results} == {"tiny-test"}
    assert yaml.safe_load((adapter / "training_config.yaml").read_text())["epochs"] == 2
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["tiny-test"]["frame_auc"] <= 1.0 and "frame_auc_ci" in results["tiny-test"]
    assert (out / "results.md").read_text().startswith("| test set |")
    assert (out / "roc.png").stat().st_size > 1000 and (out / "mask_history.png").stat().st_size > 1000
    assert [r["step"] for r in _val_lines(out)] == [6, 12]
    # the regularisers act through the step hook and their values are logged at every step (issue 27)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all(r["train/orthogonality"] > 0 and r["train/total"] > 0 for r in train_rows)
    # checkpoints hold the adapter, not the frozen backbone
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_12", "step_6"]
    assert not list((out / "checkpoints").rglob("model*.safetensors"))
    # --overwrite_output_dir recognises every file of this run as its own (issue 26.3)
    from peft_masm.recipe.checkpoints import earlier_run_outputs

    replaced = earlier_run_outputs(out)
    assert sorted(replaced) == sorted(out.iterdir())

    ev = _run(
        [
            PYTHON,
            str(RECIPES / "evaluate_detector.py"),
            "--adapter",
            str(adapter),
            "--test",
            f"mine=folder:{data}",
            "--n_bootstrap",
            "20",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["mine"]["n_frames"] == 16
    # same adapter, same images: the same AUC as train.py's own test evaluation
    assert evaluated["mine"]["frame_auc"] == pytest.approx(results["tiny-test"]["frame_auc"], abs=1e-6)

    det = _run(
        [
            PYTHON,
            "-m",
            "peft_masm.cli",
            "--adapter",
            str(adapter),
            "--json",
            "--face-detector",
            "none",
            str(data / "test" / "fake"),
        ]
    )
    assert det.returncode == 0, det.stderr[-3000:]
    scores = json.loads(det.stdout)
    assert len(scores) == 8 and all(0 <= s["fake_probability"] <= 1 for s in scores)


def test_two_processes(assets, tmp_path):
    clip, data = assets
    out = tmp_path / "ddp"
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, out, epochs=1)
    result = _train(cfg, processes=2)
    # 48 training images, batch 8 per process, 2 processes: 3 optimizer steps per epoch
    assert [r["step"] for r in _val_lines(out)] == [3]
    # each process announces and counts its own steps (issue 26.13: "6 optimizer steps", bar stopped at 3/6)
    assert "training 1 epoch(s), 3 optimizer steps each, on 2 process(es)" in result.stdout
    assert re.search(r"100%\|[^|\n]*\| 3/3 ", result.stderr), result.stderr[-2000:]
    assert (out / "adapter" / "README.md").is_file() and (out / "results.json").is_file()
    state = load_file(str(out / "checkpoints" / "step_3" / "adapter_state.safetensors"))
    assert any("masm_mask" in k for k in state)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> Path:
    """The output folder of a run of the tiny recipe that nothing stopped."""
    clip, data = assets
    root = tmp_path_factory.mktemp("uninterrupted")
    _train(write_config(root / "full.yaml", clip, data, root / "full", checkpointing_steps=2))
    return root / "full"


def _same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def test_resume_after_interruption_equals_uninterrupted_run(assets, uninterrupted, tmp_path):
    clip, data = assets
    full, cut = uninterrupted, tmp_path / "cut"
    cfg = write_config(tmp_path / "cut.yaml", clip, data, cut, checkpointing_steps=2)
    stopped = _train(cfg, "--stop_after_step", "5")
    assert "stopped after step 5" in stopped.stdout
    assert not (cut / "adapter" / "README.md").exists()
    # a checkpoint write that was interrupted half-way leaves only a temp folder, which resume ignores
    (cut / "checkpoints" / ".tmp-step_7").mkdir()
    resumed = _train(cfg, "--resume_from_checkpoint", "latest")
    assert "resumed from" in resumed.stdout and "step_5" in resumed.stdout
    _same_adapter(full, cut)
    assert _val_lines(full) == _val_lines(cut)


def test_balanced_batches_and_a_head_rate_train_and_resume_exactly(assets, tmp_path):
    """The cross-forgery benchmark's protocol as config fields (``sampling: balanced``, ``samples_per_epoch``,
    ``head_learning_rate``): two epochs of 5 balanced batches, and a run cut after step 7 resumes to the same
    adapter as one that nothing stopped."""
    clip, data = assets
    protocol = {
        "sampling": "balanced",
        "samples_per_epoch": 40,
        "head_learning_rate": 1e-2,
        "checkpointing_steps": 2,
    }
    full_cfg = write_config(tmp_path / "full.yaml", clip, data, tmp_path / "full", **protocol)
    cut_cfg = write_config(tmp_path / "cut.yaml", clip, data, tmp_path / "cut", **protocol)
    full = _train(full_cfg)
    assert "5 optimizer steps each" in full.stdout
    _train(cut_cfg, "--stop_after_step", "7")
    resumed = _train(cut_cfg, "--resume_from_checkpoint", "latest")
    assert "step_7" in resumed.stdout
    _same_adapter(tmp_path / "full", tmp_path / "cut")
    assert _val_lines(tmp_path / "full") == _val_lines(tmp_path / "cut")


def _interrupt_during_a_save(cfg: Path, out: Path) -> subprocess.CompletedProcess:
    """Start the recipe as `accelerate launch` does, and press Ctrl-C (SIGINT to the launcher and the
    training process, as a terminal does) while a checkpoint is being written."""
    args = [*_launch(), str(RECIPES / "train.py"), "--config", str(cfg)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)  # fmt: skip
    root, deadline = out / "checkpoints", time.monotonic() + 300
    while not (root / "step_2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while not list(root.glob(".tmp-*")) and time.monotonic() < deadline:  # a save under way
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_ctrl_c_is_one_line_exit_130_and_leaves_only_whole_checkpoints(assets, uninterrupted, tmp_path):
    """Issue 26.9: Ctrl-C printed a 93-line KeyboardInterrupt traceback."""
    clip, data = assets
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, out, checkpointing_steps=1)
    result = _interrupt_during_a_save(cfg, out)
    # The terminal's SIGINT reaches accelerate's launcher and the training process together. Now and then (under
    # load) the launcher sees its child's exit 130 before its own KeyboardInterrupt and reports the child's exit
    # with its own traceback, quoting the child's stderr: accelerate's race, not the recipe's. The recipe's part is
    # checked either way: exit 130, one line, no frame of ours, no KeyboardInterrupt.
    launcher_race = result.returncode == 1 and "returned non-zero exit status 130" in result.stderr
    assert result.returncode == 130 or launcher_race, result.stderr[-3000:]
    assert "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]
    ours = (
        f'File "{RECIPES}/',
        f'File "{RECIPES.parent / "peft_masm"}/',
    )  # a traceback frame of the recipe's
    assert not any(frame in result.stderr for frame in ours), result.stderr[-3000:]
    assert launcher_race or "Traceback" not in result.stderr, result.stderr[-3000:]
    said = {line.strip() for line in result.stderr.splitlines() if "interrupted" in line}
    assert len(said) == 1 and re.fullmatch(
        r"interrupted at step \d+; resume with --resume_from_checkpoint latest \(from checkpoint step_\d+\)",
        next(iter(said)),
    ), said
    assert not list(out.rglob(".tmp-*"))
    for ckpt in (out / "checkpoints").iterdir():
        files = json.loads((ckpt / "run_config.json").read_text())["files"]
        assert sorted(p.name for p in ckpt.iterdir()) == sorted([*files, "run_config.json"])
    resumed = _train(cfg, "--resume_from_checkpoint", "latest")
    assert "resumed from" in resumed.stdout
    _same_adapter(uninterrupted, out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learnig_rate": 0.1}, "Did you mean 'learning_rate'"),
        ({"epochs": "many"}, "epochs: expected an integer"),
        ({"train_path": "/nonexistent/data"}, "folder not found"),
        ({"train_split": "test", "val_split": "val", "train_path": None}, "needs train_path"),
        # found when the detector is built (a typed DetectorSettingError, not a message the script reads)
        (
            {"masm": {"num_subspaces": 8, "subspace_rank": 4}},
            "K*k = 8*4 = 32 must be smaller than the layer's rank",
        ),
    ],
)
def test_bad_input_fails_before_training(assets, tmp_path, overrides, message):
    clip, data = assets
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, tmp_path / "out", **overrides)
    result = _run([PYTHON, str(RECIPES / "train.py"), "--config", str(cfg)], timeout=180)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_empty_or_one_class_training_set_is_refused(assets, tmp_path):
    clip, _ = assets
    data = make_image_folder(tmp_path / "data", {"train": 3, "val": 2})
    for p in (data / "train" / "fake").iterdir():
        p.unlink()
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, tmp_path / "out", test_sets=[])
    result = _run([PYTHON, str(RECIPES / "train.py"), "--config", str(cfg)], timeout=180)
    assert result.returncode == 2 and "only real samples" in result.stderr


def test_push_to_hub_uploads_adapter_card_and_config_without_printing_the_token(assets, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the Hub test double
    from hub_commit_double import commit_api_double
    from hub_fixtures import hub_env

    clip, data = assets
    secret = "hf_recipeTestSecret123"
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, tmp_path / "out", epochs=1)
    with commit_api_double() as hub:
        environment = env()
        environment.update(hub_env(endpoint=hub.endpoint, cache_dir=tmp_path / "cache", offline=False))
        environment.update(HF_TOKEN=secret, PYTHONPATH=str(RECIPES.parent))
        result = subprocess.run(
            [
                PYTHON,
                str(RECIPES / "train.py"),
                "--config",
                str(cfg),
                "--push_to_hub",
                "--hub_model_id",
                "test-org/tiny-masm",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        files = sorted(hub.repos["test-org/tiny-masm"].files)
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "detector_config.json",
        "preprocessor_config.json",
        "training_config.yaml",
    ]
    assert secret not in result.stdout + result.stderr
    assert "pushed the adapter to test-org/tiny-masm" in result.stdout


def test_push_without_token_fails_before_training(assets, tmp_path):
    clip, data = assets
    cfg = write_config(
        tmp_path / "cfg.yaml", clip, data, tmp_path / "out", push_to_hub=True, hub_model_id="test-org/x"
    )
    environment = env(HF_HOME=str(tmp_path / "hf-home"))
    environment.pop("HF_TOKEN", None)
    result = subprocess.run(
        [PYTHON, str(RECIPES / "train.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=180,
        env=environment,
    )
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--masm.layer_mask", "static", "--mask_calibration_batches", "2"],
        ["--method", "lora", "--lora.r", "2", "--lora.target_modules", "[q_proj, v_proj]"],
    ],
    ids=["masm-static-mask", "lora-baseline"],
)
def test_static_mask_and_lora_baseline_train(assets, tmp_path, extra):
    clip, data = assets
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", clip, data, out, epochs=1)
    result = _run([PYTHON, str(RECIPES / "train.py"), "--config", str(cfg), *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == ("LORA" if "lora" in extra else "MASM")
    assert "classifier" in adapter_config["modules_to_save"]
    assert (out / "results.json").is_file() and (out / "adapter" / "README.md").is_file()
