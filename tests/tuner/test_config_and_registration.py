import importlib
import re

import pytest
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn

import peft_masm
from peft_masm import MASMConfig, MASMModel, default_target_modules
from peft_masm.tuner import register

from .conftest import tiny_clip, tiny_dinov2, tiny_vit


def test_registration_is_real_and_idempotent():
    assert PeftType.MASM == "MASM" and PeftType("MASM") is PeftType.MASM
    assert PeftType.MASM.value == "MASM" and PeftType.MASM in list(PeftType)
    register()
    importlib.reload(peft_masm)  # a module reload registers the reloaded classes again
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MASM] is peft_masm.MASMConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MASM] is peft_masm.MASMModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MASM] == "masm_"
    assert list(PeftType).count(PeftType.MASM) == 1


def test_config_round_trip(tmp_path):
    config = MASMConfig(num_subspaces=3, subspace_rank=2, partition="contiguous", target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MASMConfig)
    assert loaded.peft_type == PeftType.MASM
    assert (loaded.num_subspaces, loaded.subspace_rank, loaded.partition) == (3, 2, "contiguous")
    assert loaded.total_rank == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_subspaces": 0}, "num_subspaces must be a positive integer"),
        ({"subspace_rank": -1}, "subspace_rank must be a positive integer"),
        ({"partition": "random"}, "partition='random' is not one of"),
        ({"train_factors": "U"}, "train_factors='U' is not one of"),
        ({"layer_mask": "sometimes"}, "layer_mask='sometimes' is not one of"),
        ({"mask_keep_ratio": 0.0}, "mask_keep_ratio must be a number in (0, 1]"),
        ({"mask_keep_ratio": 1.5}, "mask_keep_ratio must be a number in (0, 1]"),
        ({"mask_interval": 0}, "mask_interval must be a positive integer"),
        ({"mask_warmup": -1}, "mask_warmup must be an integer >= 0"),
        ({"orthogonality_weight": -1.0}, "orthogonality_weight must be a finite number >= 0"),
        # Wrong types and non-finite numbers (issue 10, item 5): each names its field.
        (
            {"orthogonality_weight": "0.1"},
            "orthogonality_weight must be a finite number >= 0, got '0.1' (a string",
        ),
        ({"spectral_weight": None}, "spectral_weight must be a finite number >= 0, got None"),
        ({"fit_bound": float("nan")}, "fit_bound must be a finite number > 0, got nan"),
        ({"fit_bound": float("inf")}, "fit_bound must be a finite number > 0, got inf"),
        ({"subspace_alpha": 0.0}, "subspace_alpha must be None or a finite number > 0, got 0.0"),
        ({"fit_constraint": "clip"}, "fit_constraint='clip' is not one of"),
        ({"mask_ema_decay": float("nan")}, "mask_ema_decay must be a number in [0, 1), got nan"),
        ({"num_subspaces": True}, "num_subspaces must be a positive integer, got True (bool)"),
        ({"subspace_rank": 2.0}, "subspace_rank must be a positive integer, got 2.0 (float)"),
        ({"mask_interval": "20"}, "mask_interval must be a positive integer, got '20' (str)"),
        ({"mask_warmup": False}, "mask_warmup must be an integer >= 0, got False (bool)"),
        ({"init_weights": 1}, "init_weights must be True or False, got 1 (int)"),
        ({"check_base_model": "yes"}, "check_base_model must be True or False, got 'yes' (str)"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MASMConfig(**kwargs)


def _adapted(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, peft_masm.MASMLayer))


@pytest.mark.parametrize(
    "factory, expected",
    [
        (tiny_clip, {"q_proj", "k_proj", "v_proj", "out_proj"}),
        (tiny_vit, {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (tiny_dinov2, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ],
)
def test_default_targets_are_the_attention_projections(factory, expected):
    model = get_peft_model(factory(), MASMConfig(num_subspaces=2, subspace_rank=2))
    names = _adapted(model)
    assert len(names) == 2 * 4  # two blocks, four projections
    assert {n.rsplit(".", 1)[1] for n in names} == expected


def test_include_mlp_adds_the_mlp():
    targets = default_target_modules("clip_vision_model", include_mlp=True)
    model = get_peft_model(tiny_clip(), MASMConfig(num_subspaces=2, subspace_rank=2, target_modules=targets))
    assert {n.rsplit(".", 1)[1] for n in _adapted(model)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }


def test_full_clip_keeps_its_text_tower_frozen():
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=99
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = get_peft_model(CLIPModel(config), MASMConfig(num_subspaces=2, subspace_rank=2))
    names = _adapted(model)
    assert names and all("vision_model" in n for n in names)


def test_unknown_model_type_needs_explicit_targets():
    with pytest.raises(ValueError, match="no default target modules"):
        default_target_modules("bert")


def test_get_peft_model_on_an_unknown_model_type_gives_masm_s_error():
    """Not PEFT's generic "Please specify `target_modules`": MASM's own message, naming the known types."""
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    )
    with pytest.raises(
        ValueError, match=r"no default target modules for model_type='bert' \(known: .*deit.*\)"
    ):
        get_peft_model(bert, MASMConfig(num_subspaces=2, subspace_rank=2))


def test_rank_larger_than_layer_names_the_layer():
    with pytest.raises(
        ValueError, match=r"self_attn\.[qkv]_proj: K\*k = 8\*4 = 32 must be smaller than the layer's rank 32"
    ):
        get_peft_model(tiny_clip(), MASMConfig(num_subspaces=8, subspace_rank=4))


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_clip(), MASMConfig(target_modules=["does_not_exist"]))


def test_non_linear_target_is_refused():
    with pytest.raises(
        TypeError, match=r"patch_embedding' is a Conv2d; MASM adapts torch.nn.Linear layers only"
    ):
        get_peft_model(tiny_clip(), MASMConfig(target_modules=["patch_embedding"]))


def test_masm_model_is_the_tuner():
    model = get_peft_model(
        tiny_vit(), MASMConfig(num_subspaces=2, subspace_rank=2, modules_to_save=["classifier"])
    )
    assert isinstance(model.base_model, MASMModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("masm_" in n) or ("classifier" in n) for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert not any(
        isinstance(m, nn.Linear) and m.weight.requires_grad for m in model.base_model.model.vit.modules()
    )
