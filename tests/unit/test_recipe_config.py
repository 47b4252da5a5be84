"""Recipe configuration: YAML + command-line overrides validated into TrainConfig, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_masm.recipe.config import ConfigError, TrainConfig, load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        _yaml(tmp_path, "epochs: 3\nmasm: {num_subspaces: 2}\n"),
        [
            "--learning_rate",
            "1e-4",
            "--masm.subspace_rank=3",
            "--push_to_hub",
            "--hub_model_id",
            "o/n",
            "--train_families",
            "sbi,gan_upsample",
            "--max_grad_norm",
            "null",
            "--epochs",
            "5",
        ],
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.epochs == 5
    assert cfg.masm == {"num_subspaces": 2, "subspace_rank": 3}
    assert cfg.push_to_hub is True and cfg.hub_model_id == "o/n"
    assert cfg.train_families == ["sbi", "gan_upsample"]
    assert cfg.max_grad_norm is None


def test_unknown_key_suggests_nearest_name(tmp_path):
    with pytest.raises(ConfigError, match="'learning_rte'.*Did you mean 'learning_rate'"):
        load_config(_yaml(tmp_path, "learning_rte: 0.1\n"))
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config(None, ["--epoch", "2"])
    with pytest.raises(ConfigError, match="'num_subspace'.*masm.*Did you mean 'num_subspaces'"):
        load_config(None, ["--masm.num_subspace", "2"])


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--epochs", "three"], "epochs: expected an integer, got 'three'"),
        (["--learning_rate", "fast"], "learning_rate: expected a number"),
        (["--balance_classes", "maybe"], "balance_classes: expected true or false"),
        (["--method", "loar"], "not one of \\['masm', 'lora'\\].*Did you mean 'lora'"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--data", "folder"], "needs train_path"),
        (["--push_to_hub"], "needs hub_model_id"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, args)


def test_test_sets_are_validated(tmp_path):
    bad = "test_sets:\n  - {name: x, kind: folder, pth: /tmp}\n"
    with pytest.raises(ConfigError, match="'pth'.*Did you mean 'path'"):
        load_config(_yaml(tmp_path, bad))
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(_yaml(tmp_path, "test_sets:\n  - {name: x, kind: folder}\n"))


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="unexpected argument 'epochs'"):
        load_config(None, ["epochs", "3"])


@pytest.mark.parametrize("path", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.output_dir
    config = cfg.adapter  # field values valid too, presets resolved
    if path.name == "effort.yaml":
        from peft_masm.presets import masm_config

        assert config.to_dict() == masm_config("effort").to_dict()
        assert cfg.pooling == "pooler_output" and cfg.lr_scheduler == "constant"


@pytest.mark.parametrize(
    "path", sorted((RECIPES / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.distributed_type is not None


@pytest.mark.parametrize(
    "override, message",
    [
        (["--masm.layer_mask", "dynamc"], "masm: MASMConfig.layer_mask='dynamc' is not one of"),
        (["--masm.subspace_rank", "0"], "masm: MASMConfig.subspace_rank must be a positive integer"),
        (["--masm.preset", "efort"], "masm.preset: unknown preset 'efort'"),
        (["--masm.num_subspace", "2"], "unknown key 'num_subspace' in masm. Did you mean 'num_subspaces'"),
    ],
)
def test_bad_adapter_values_fail_at_parse_time_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_presets_are_the_single_definition():
    from peft_masm.presets import PRESETS, masm_config

    cfg = load_config(None, ["--masm.preset", "effort", "--masm.partition", "contiguous"])
    config = cfg.adapter
    assert (config.num_subspaces, config.subspace_rank, config.layer_mask) == (1, 1, "none")
    assert config.partition == "contiguous"  # the section overrides the preset
    assert masm_config("paper").layer_mask == PRESETS["paper"]["layer_mask"]


@pytest.mark.parametrize(
    "text", ["", "\n", "# only a comment\n# and another\n"], ids=["empty", "blank", "comments"]
)
def test_an_empty_or_all_comment_config_is_refused(tmp_path, text):
    """Issue 26.2: an empty file used to start the default run (CLIP B/16, 10 epochs) without a word."""
    with pytest.raises(ConfigError, match="is empty \\(or only comments\\)") as err:
        load_config(_yaml(tmp_path, text))
    assert "recipes/configs/" in str(err.value) and "\n" not in str(err.value)


def test_help_lists_the_allowed_values_of_every_choice():
    """Issue 26.12: --help showed `Literal` without the values it allows."""
    from peft_masm.recipe.config import format_help

    text = format_help()
    assert "Literal" not in text
    assert "--method {masm,lora}\n" in text
    assert "--lr_scheduler {constant,cosine,linear}\n" in text
    assert "--train_families list[str]\n" in text and "--image_size int | None\n" in text


def _accelerate_trackers() -> list[str]:
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


@pytest.mark.parametrize("name", _accelerate_trackers())
def test_a_tracker_that_is_not_installed_is_refused_with_its_package(monkeypatch, name):
    """Issue 26.10: accelerate drops a missing tracker with a warning, and the run ends without its logs."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--report_to", f"json,{name}"])
    assert str(err.value) == (
        f"report_to: {name} is not installed; `pip install {name}`, or log without it (--report_to json)."
    )
    monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda: True)
    assert load_config(None, ["--report_to", name]).report_to == [name]


def test_an_unknown_tracker_is_refused_with_the_nearest_name():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'. Did you mean 'tensorboard'"):
        load_config(None, ["--report_to", "tensorbord"])
    assert load_config(None, ["--report_to", "none"]).report_to == ["none"]


def test_the_adapter_section_becomes_its_config_object_once(tmp_path):
    """Issue 28: the masm: section was validated into a MASMConfig, thrown away, and built again by train.py."""
    from peft_masm.tuner import MASMConfig

    cfg = load_config(
        _yaml(tmp_path, "masm: {num_subspaces: 4, target_modules: [q_proj]}\n"), ["--masm.subspace_rank", "3"]
    )
    assert isinstance(cfg.adapter, MASMConfig)
    assert (cfg.adapter.num_subspaces, cfg.adapter.subspace_rank) == (4, 3)
    assert cfg.masm == {"num_subspaces": 4, "target_modules": ["q_proj"], "subspace_rank": 3}  # as written
    assert "adapter" not in cfg.to_dict() and "adapter" not in cfg.run_identity()
    lora = load_config(None, ["--method", "lora", "--lora.r", "4"]).adapter
    assert type(lora).__name__ == "LoraConfig" and lora.r == 4


def test_building_the_config_mutates_nothing_it_was_given():
    section = {"num_subspaces": 2, "target_modules": ["q_proj", "v_proj"]}
    cfg = TrainConfig(masm=section)
    assert section == {"num_subspaces": 2, "target_modules": ["q_proj", "v_proj"]}
    assert cfg.adapter.target_modules == {"q_proj", "v_proj"} and cfg.masm["target_modules"] == [
        "q_proj",
        "v_proj",
    ]


def test_yaml_values_are_typed_like_command_line_ones(tmp_path):
    with pytest.raises(ConfigError, match="epochs: expected an integer, got 3.5 \\(float\\)"):
        load_config(_yaml(tmp_path, "epochs: 3.5\n"))
    with pytest.raises(ConfigError, match="train_families: expected a list"):
        load_config(_yaml(tmp_path, "train_families: {sbi: 1}\n"))
    cfg = load_config(_yaml(tmp_path, "learning_rate: 1e-4\nweight_decay: 0\nepochs: 3\n"), ["--epochs", "4"])
    assert cfg.learning_rate == pytest.approx(1e-4) and isinstance(cfg.weight_decay, float)
    assert cfg.epochs == 4  # the command line overrides the file


def test_the_parser_is_hf_argument_parser_with_its_flags():
    from transformers import HfArgumentParser

    from peft_masm.recipe.config import RecipeArgumentParser

    assert isinstance(RecipeArgumentParser(), HfArgumentParser)
    assert load_config(None, ["--no_balance_classes"]).balance_classes is False
    assert load_config(None, ["--balance-classes", "false", "--plot_mask", "no"]).plot_mask is False
    assert load_config(None, ["--output_dir=out.d/x"]).output_dir == "out.d/x"
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):  # no argparse prefix matching
        load_config(None, ["--epoch", "2"])


def test_an_override_of_the_section_the_method_does_not_use_is_refused():
    """Every flag does what it says: --lora.r with method masm changed nothing."""
    with pytest.raises(ConfigError, match="--lora.r: method is masm, so the lora: section is not used"):
        load_config(None, ["--lora.r", "2"])


def test_on_non_finite_defaults_to_the_adapters_own_setting():
    """The recipe's on_non_finite (default 'raise') overrode masm.on_non_finite: skip without a word."""
    cfg = load_config(None, ["--masm.on_non_finite", "skip"])
    assert cfg.on_non_finite is None and cfg.adapter.on_non_finite == "skip"
    assert load_config(None, ["--on_non_finite", "skip"]).on_non_finite == "skip"


def test_help_lists_every_field_once_with_type_and_default():
    import dataclasses

    from peft_masm.recipe.config import format_help

    text = format_help()
    for f in dataclasses.fields(TrainConfig):
        assert (f"  --{f.name} " in text) is f.init, f.name
    assert "--learning-rate" not in text  # HfArgumentParser's hyphen aliases work but are not listed twice
    assert "95%" in text and "(default: 'clip-vit-b16')" in text
