"""``layers_to_transform`` holds for MASM's regex default targets too (CLIP, SigLIP, ...): PEFT applies layer indices
to a list of target names only, so before the fix every layer was adapted, silently."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model

from peft_masm import MASMConfig
from peft_masm.tuner import DEFAULT_ATTENTION_TARGETS


def _clip() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 16}  # fmt: skip
    return tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))


def _adapted_layers(model: torch.nn.Module) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if "masm_U" in n}


@pytest.mark.parametrize(
    "fields",
    [
        {"layers_to_transform": [0, 2]},
        {"layers_to_transform": [0, 2], "layers_pattern": "layers"},
        {"layers_to_transform": [0, 2], "target_modules": DEFAULT_ATTENTION_TARGETS["clip"]},  # a regex given
    ],
    ids=["default-targets", "with-layers-pattern", "explicit-regex"],
)
def test_only_the_chosen_layers_are_adapted_and_reload_the_same(fields, tmp_path):
    assert isinstance(DEFAULT_ATTENTION_TARGETS["clip"], str)  # the case PEFT's own matching ignored
    model = get_peft_model(_clip(), MASMConfig(num_subspaces=2, subspace_rank=2, **fields))
    assert _adapted_layers(model) == {0, 2}
    assert not any("text_model" in n for n, _ in model.named_parameters() if "masm_" in n)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_clip(), tmp_path)
    assert _adapted_layers(loaded) == {0, 2}
    assert loaded.peft_config["default"].layers_to_transform == [0, 2]


def test_a_single_layer_index_as_an_int():
    model = get_peft_model(_clip(), MASMConfig(num_subspaces=2, subspace_rank=2, layers_to_transform=1))
    assert _adapted_layers(model) == {1}
