"""The one registry of methods (``recipes/methods/*.yaml``, ``peft_masm.recipe.methods``), the targets' limits read from
``benchmarks/targets.yaml``, and the benchmarks' functions kept short (issue 28, item 5)."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cross_forgery  # noqa: E402
import device_suite  # noqa: E402
import harness  # noqa: E402
import speed  # noqa: E402
import speed_report  # noqa: E402
import step_hooks_overhead  # noqa: E402

from peft_masm.recipe import methods as method_registry  # noqa: E402

CONTEXT = {"steps": 30, "reg_weight": 0.1, "layer_norms": ["layernorm", "layer_norm1"]}


@pytest.fixture
def registry_copy(tmp_path, monkeypatch):
    """A copy of the registry the test may edit; every benchmark reads it instead of the real one."""
    folder = tmp_path / "methods"
    shutil.copytree(method_registry.METHODS_DIR, folder)
    monkeypatch.setattr(method_registry, "METHODS_DIR", folder)
    method_registry._read.cache_clear()
    yield folder
    method_registry._read.cache_clear()


def test_every_method_file_loads_into_its_peft_config():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    names = method_registry.names()
    assert len(names) >= 20 and "masm_reg" in names and "masm_swept" in names
    for name in names:
        peft_type = method_registry.spec(name).get("peft_type")
        for targets, head in ((["q_proj", "v_proj"], ["classifier"]), (None, None)):
            config = method_registry.method_config(name, 384, targets, head=head, **CONTEXT)
            if peft_type is None:
                assert config is None, name
                continue
            assert isinstance(config, PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]), name
            if targets is not None and name != "ln_tuning":  # LN tuning targets the LayerNorms
                assert sorted(config.target_modules) == targets, name


def test_expressions_and_inheritance_are_computed_from_the_benchmark():
    swept = method_registry.method_config("masm_swept_no_ortho", 384, steps=120, reg_weight=10.0)
    assert (swept.orthogonality_weight, swept.spectral_weight) == (0.0, 10.0)
    assert swept.mask_warmup == swept.mask_interval == 30 and swept.layer_mask == "dynamic"
    assert method_registry.method_config("osf", 768).effective_rank == 760
    explicit = method_registry.method_config("masm_reg_explicit")
    assert explicit.step_hooks is False and explicit.orthogonality_weight == 0.1
    assert method_registry.method_config("effort").num_subspaces == 1  # peft_masm.presets' "effort"
    with pytest.raises(ValueError, match="needs 'steps'"):
        method_registry.method_config("masm_swept", 384, reg_weight=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        method_registry.method_config("no_such_method")


def test_speed_and_the_cross_forgery_read_the_same_registry(registry_copy):
    # every method the speed benchmarks and the cross-forgery rows name is a file of the registry
    names = set(method_registry.names())
    parser = speed.build_parser()
    speed_lists = ("methods_small", "methods_extra", "methods_large", "workers_large", "compile_methods")
    used = {m for option in speed_lists for m in parser.get_default(option).split(",")}
    used |= (
        set(device_suite.DEVICE_METHODS) | set(step_hooks_overhead.METHODS) | {"masm_dynamic", "masm_nomask"}
    )
    assert used <= names
    assert set(cross_forgery.DEFAULT_METHODS.split(",")) <= names  # the cross-forgery table's rows
    # an edit of one file reaches the speed benchmarks and the comparisons (which build every method through it)
    path = registry_copy / "lora_r8.yaml"
    path.write_text(path.read_text().replace("r: 8", "r: 3"))
    method_registry._read.cache_clear()
    assert speed.method_config("lora_r8", 768).r == 3
    assert method_registry.method_config("lora_r8", 384).r == 3


def test_device_suite_takes_its_pieces_from_the_shared_modules():
    import inspect

    assert "speed" not in inspect.signature(device_suite.run_device_suite).parameters
    assert device_suite.inject is harness.inject is speed.inject


def _training_results(ratio: float) -> dict:
    lora = [1.0, 1.1, 0.9, 1.0]
    return {
        "training": {
            "m": {
                "model": "m",
                "times": {"lora_r8": lora, "masm_reg": [ratio * t for t in lora]},
                "batch_size": 1,
                "steps": 4,
                "warmup": 0,
            }
        },
        "workers": [],
    }


def test_targets_read_their_limits_from_data():
    limits = speed_report.load_limits()
    assert limits["step"]["max_ratio"] == pytest.approx(1.10)
    (target,) = speed_report.targets(_training_results(1.05))
    assert target["target"] == "m batch 1 masm_reg step / LoRA-r8 step <= 1.10" and target["pass"]
    limits["step"]["max_ratio"] = 1.02
    (target,) = speed_report.targets(_training_results(1.05), limits)
    assert target["target"].endswith("<= 1.02") and not target["pass"]


def test_no_benchmark_function_is_longer_than_80_lines():
    long = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
