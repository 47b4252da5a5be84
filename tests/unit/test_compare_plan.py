"""The runs a comparison makes, how it chooses learning rates, and which output folders it accepts
(``peft_masm.recipe.compare``; the end-to-end runs are in tests/e2e/test_compare.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from recipe_fixtures import RECIPES

from peft_masm.recipe.compare import ComparePlan, Run, RunStore, claim_output_dir, run_identity
from peft_masm.recipe.config import ConfigError, TrainConfig


def _compare_cli():
    """recipes/compare.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("compare_cli", RECIPES / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plan_counts_sweep_test_and_noise_runs():
    plan = ComparePlan(["masm", "lora", "linear_probe"], "masm", [0, 1, 2], learning_rates=None)
    assert plan.grids["masm"] == [3e-4, 1e-3, 3e-3, 1e-2] and plan.grids["linear_probe"] == [
        3e-4,
        1e-3,
        3e-3,
        1e-2,
    ]
    assert len(plan.sweep_runs()) == 12 and {r.seed for r in plan.sweep_runs()} == {0}
    final = plan.final_runs({"masm": 1e-3, "lora": 3e-3, "linear_probe": 1e-2})
    assert plan.count() == 12 + 9 + 3 == len(plan.sweep_runs()) + len(final)
    noise = [r for r in final if r.stage == "noise"]
    assert [(r.method, r.learning_rate, r.seed) for r in noise] == [
        ("masm", 1e-3, s) for s in (100, 101, 102)
    ]
    assert "24 runs" in plan.describe()


def test_one_learning_rate_for_all_means_no_sweep():
    plan = ComparePlan(["masm", "lora"], "masm", [0, 1], learning_rates=[5e-3])
    assert plan.sweep_runs() == [] and plan.count() == 4 + 2


def test_a_rate_per_named_method_pins_it_and_the_others_keep_their_grid():
    """The benchmark's protocol on folds 2-6: the rates chosen on validation of folds 0-1, passed per method."""
    cli = _compare_cli()
    rates = cli.learning_rates("masm=1e-3, lora=3e-4")
    assert rates == {"masm": [1e-3], "lora": [3e-4]}
    plan = ComparePlan(["masm", "lora", "effort"], "masm", [0, 1], learning_rates=rates)
    assert plan.grids["masm"] == [1e-3] and plan.grids["lora"] == [3e-4]
    assert {r.method for r in plan.sweep_runs()} == {"effort"}
    assert cli.learning_rates("1e-3,3e-3") == [1e-3, 3e-3]
    assert cli.learning_rates("masm=1e-3,masm=3e-3") == {"masm": [1e-3, 3e-3]}  # not the last one silently
    for bad in ("masm=fast", "1e-3,masm=1e-3", "masm=1e-3=2"):
        with pytest.raises(ConfigError, match="comma-separated numbers or method=rate pairs"):
            cli.learning_rates(bad)
    with pytest.raises(ConfigError, match=r"--learning_rates names \['osf'\], not among --methods masm,lora"):
        ComparePlan(["masm", "lora"], "masm", [0], learning_rates={"osf": [1e-3]})


def test_the_reference_and_the_methods_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="reference method 'masm' is not among --methods lora"):
        ComparePlan(["lora"], "masm", [0])
    with pytest.raises(ConfigError, match="unknown method 'no_such'.*masm"):
        ComparePlan(["masm", "no_such"], "masm", [0])
    with pytest.raises(ConfigError, match="twice"):
        ComparePlan(["masm", "masm"], "masm", [0])
    with pytest.raises(ConfigError, match="positive"):
        ComparePlan(["masm"], "masm", [0], learning_rates=[-1.0])


def test_validation_chooses_the_rate_and_a_tie_goes_to_the_first(tmp_path):
    cfg = TrainConfig()
    plan = ComparePlan(["masm", "lora"], "masm", [0], learning_rates=[1e-3, 3e-3, 1e-2])
    store = RunStore(tmp_path, cfg)
    metrics = {"masm": [0.6, 0.7, 0.65], "lora": [0.8, 0.8, 0.5]}
    for run in plan.sweep_runs():
        store.save(run, {"val_metric": metrics[run.method][plan.grids[run.method].index(run.learning_rate)]})
    assert plan.choose(store) == {"masm": 3e-3, "lora": 1e-3}


def test_a_run_is_done_only_with_the_same_config_and_method_file(tmp_path, monkeypatch):
    cfg = TrainConfig()
    run = Run("masm", "test", 1e-3, 0)
    store = RunStore(tmp_path, cfg)
    store.save(run, {"val_metric": 0.5})
    assert store.done(run) and not store.done(Run("masm", "test", 1e-3, 1))
    assert not RunStore(tmp_path, TrainConfig(epochs=2)).done(run)  # the config changed
    assert RunStore(tmp_path, TrainConfig(learning_rate=1.0, seed=5)).done(
        run
    )  # set per run: not the config's
    method = tmp_path / "mine.yaml"
    method.write_text("peft_type: MASM\nconfig:\n  num_subspaces: 2\n")
    mine = Run(str(method), "test", 1e-3, 0)
    store.save(mine, {})
    assert store.done(mine) and store.path(mine).parent.name == "mine"
    before = run_identity(cfg, mine)
    method.write_text("peft_type: MASM\nconfig:\n  num_subspaces: 3\n")
    from peft_masm.recipe import methods

    methods._read.cache_clear()
    assert run_identity(cfg, mine) != before and not store.done(mine)  # the method file changed: run again


def test_the_output_folder_is_new_or_the_same_comparison(tmp_path):
    out = tmp_path / "out"
    claim_output_dir(out, TrainConfig(), overwrite=False)
    claim_output_dir(out, TrainConfig(seed=3), overwrite=False)  # resumable: the seed is set per run
    (out / "runs").mkdir()
    (out / "runs" / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="another config"):
        claim_output_dir(out, TrainConfig(epochs=5), overwrite=False)
    claim_output_dir(out, TrainConfig(epochs=5), overwrite=True)
    assert (
        not (out / "runs").exists()
        and json.loads((out / "comparison.json").read_text())["config"]["epochs"] == 5
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        claim_output_dir(other, TrainConfig(), overwrite=False)
    claim_output_dir(other, TrainConfig(), overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"  # only a comparison's own files are removed
