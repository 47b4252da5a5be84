"""``recipes/compare.py`` end to end on a small DeepfakeBench layout: frames on disk, a training JSON, and a JSON
with two test datasets (one with videos), two methods and two seeds; resume; the one-line errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from recipe_fixtures import ACCELERATE, PYTHON, RECIPES, env, make_deepfakebench, save_tiny_clip


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    paths = make_deepfakebench(root / "dfb")
    common = {"kind": "deepfakebench", "path": str(paths["tests"]), "split": "test", "label_dict": str(paths["labels"]),
              "compression": None}  # fmt: skip
    cfg = {
        "backbone": str(save_tiny_clip(root / "clip")),
        "data": "deepfakebench", "train_path": str(paths["train"]), "train_split": "train", "val_split": "val",
        "label_dict": str(paths["labels"]), "compression": None, "frames_per_video": 3,
        "test_sets": [{"name": "TinyCDF", "dataset_name": "TinyCDF", **common},
                      {"name": "TinyStills", "dataset_name": "TinyStills", **common}],
        "epochs": 2, "batch_size": 8, "eval_batch_size": 32, "lr_scheduler": "constant", "n_bootstrap": 50, "seed": 0,
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def compare(*args: str, launcher: tuple[str, ...] = (PYTHON,)) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(RECIPES / "compare.py"), *args], env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_two_methods_two_seeds_then_resume(config, tmp_path):
    out = tmp_path / "out"
    args = ("--config", str(config), "--methods", "masm,lora", "--seeds", "2", "--learning_rates", "5e-3,1e-2",
            "--output_dir", str(out))  # fmt: skip
    first = compare(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "10 runs: 4 to choose learning rates on validation, 2 methods x 2 seeds" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["masm", "lora", "masm (other seeds)"]
    assert summary["test_sets"] == summary["averaged_over"] == ["TinyCDF", "TinyStills"]
    for row in summary["rows"]:
        assert (
            row["learning_rate"] in (5e-3, 1e-2)
            and row["trainable_backbone"] > 0
            and row["trainable_head"] == 66 * 2
        )
        assert (
            "video_auc" in row["tests"]["TinyCDF"] and "video_auc" not in row["tests"]["TinyStills"]
        )  # 1 frame each
        assert 0.0 <= row["tests"]["TinyCDF"]["frame_auc"] <= 1.0
    masm, lora, noise = summary["rows"]
    assert "vs_reference" not in masm and masm["seeds"] == [0, 1] and noise["seeds"] == [100, 101]
    assert set(masm["sweep"]) == {"0.005", "0.01"} and masm["learning_rate"] == float(
        max(masm["sweep"], key=masm["sweep"].get)
    )
    for row in (lora, noise):
        for point, low, high in row["vs_reference"].values():
            assert low <= point <= high
    runs = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("*.json"))
    assert len(runs) == 10 and "masm/noise-lr{:g}-seed100.json".format(masm["learning_rate"]) in runs
    record = json.loads((out / "runs" / runs[-1]).read_text())
    assert (
        len(record["test_scores"]["TinyCDF"]) == 2 * 4 * 3 and len(record["test_scores"]["TinyStills"]) == 16
    )
    table = (out / "table.md").read_text()
    assert "| lora |" in table and "Noise floor: masm trained again with other seeds" in table
    assert (out / "forest.png").stat().st_size > 0
    items = json.loads(
        (out / "test_items.json").read_text()
    )  # the runs' scores, item by item, can be re-analysed
    assert (
        len(items["TinyCDF"]["labels"])
        == len(items["TinyCDF"]["video_ids"])
        == len(record["test_scores"]["TinyCDF"])
    )
    # the same command again: nothing is trained again, and the report is the same
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    again = compare(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 already done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == stamps
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_method_file_of_ones_own_with_layers_chosen_by_gradients(config, tmp_path):
    # adding a method is adding a file: here FMSD (layers chosen before training), sized for the tiny backbone
    mine = tmp_path / "fmsd_tiny.yaml"
    mine.write_text(
        "extends: fmsd\nlayer_selection: {keep: 0.5, batches: 3}\nconfig: {num_subspaces: 2, subspace_rank: 1}\n"
    )
    out = tmp_path / "out"
    result = compare("--config", str(config), "--methods", f"masm,{mine}", "--seeds", "1", "--learning_rates", "5e-3",
                     "--output_dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    masm, fmsd, _ = json.loads((out / "summary.json").read_text())["rows"]
    assert fmsd["method"] == "fmsd_tiny" and (out / "runs" / "fmsd_tiny").is_dir()
    assert fmsd["adapted_layers"] in ([[0]], [[1]])  # one of the tiny CLIP's two layers
    # masm: K*k = 8 on both layers' four projections; fmsd_tiny: K*k = 2 on one layer's
    assert fmsd["trainable_backbone"] * 8 == masm["trainable_backbone"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--methods", "lora,osf"), "the reference method 'masm' is not among --methods lora,osf"),
        (("--methods", "masm,lora_r99"), "unknown method 'lora_r99'"),
        (("--seeds", "0"), "--seeds must be at least 1"),
        (("--learning_rates", "fast"), "--learning_rates takes comma-separated numbers"),
        (("--epochs", "0"), "epochs must be a positive integer"),
        (
            ("--methods", "masm,masm_swept"),
            "method 'masm_swept' cannot be built here: method 'masm_swept' needs 'reg_weight'",
        ),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(config, tmp_path, extra, message):
    result = compare("--config", str(config), "--output_dir", str(tmp_path / "out"), *extra)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "runs").exists()


def test_another_config_in_the_same_folder_is_refused(config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "comparison.json").write_text(json.dumps({"config": {"epochs": 9}}))
    result = compare("--config", str(config), "--methods", "masm", "--seeds", "1", "--output_dir", str(out))
    assert result.returncode == 2 and "holds a comparison of another config" in result.stderr


@pytest.mark.slow
def test_under_accelerate_launch_with_two_processes(config, tmp_path):
    out = tmp_path / "out"
    launcher = (ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no")  # fmt: skip
    result = compare("--config", str(config), "--methods", "masm,lora", "--seeds", "1", "--learning_rates", "5e-3",
                     "--output_dir", str(out), launcher=launcher)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("3 runs:") == 1  # the main process speaks for both
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["masm", "lora", "masm (other seeds)"]
    assert len(list((out / "runs").rglob("*.json"))) == 3
