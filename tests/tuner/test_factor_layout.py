"""One trainable tensor per factor and layer (issue 12): the layout is fast and changes nothing else.

A layer used to hold K tensors per factor (3K per layer, 1,154 on a ViT-L/14): the optimizer, the gradient
check and the backward then launched several ops per tensor, which made MASM's step host-bound on a GPU.
Only a mask over single subspaces needs per-subspace tensors; files keep one key per subspace either way.
"""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_training import image_batch, tiny_vit_classifier

from peft_masm import MASMConfig
from peft_masm.training import TrainingStep
from peft_masm.tuner.layer import MASMLayer

from .conftest import output_of, tiny_vit

SUBSPACE_MASK = {"layer_mask": "dynamic", "mask_granularity": "subspace"}


def _config(**kwargs) -> MASMConfig:
    return MASMConfig(**{"num_subspaces": 4, "subspace_rank": 2, **kwargs})


def _layers(model) -> list[MASMLayer]:
    return [m for m in model.modules() if isinstance(m, MASMLayer)]


def _first_layer_key(model) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, MASMLayer))


def _trainable_per_layer(model) -> set[int]:
    return {sum(1 for p in layer.parameters() if p.requires_grad) for layer in _layers(model)}


def test_a_layer_trains_three_tensors_unless_single_subspaces_are_masked():
    assert _trainable_per_layer(get_peft_model(tiny_vit(), _config())) == {3}
    assert _trainable_per_layer(get_peft_model(tiny_vit(), _config(layer_mask="dynamic"))) == {3}
    assert _trainable_per_layer(get_peft_model(tiny_vit(), _config(**SUBSPACE_MASK))) == {12}


@pytest.mark.parametrize("source, target", [({}, SUBSPACE_MASK), (SUBSPACE_MASK, {})])
def test_state_dicts_hold_one_key_per_subspace_and_load_into_either_layout(source, target, pixels):
    trained = get_peft_model(tiny_vit(), _config(init_weights=False, **source))
    state = trained.state_dict()
    q_proj = _first_layer_key(trained)
    for j in range(4):
        assert state[f"{q_proj}.masm_U.default.{j}"].shape == (32, 2)
        assert state[f"{q_proj}.masm_s.default.{j}"].shape == (2,)
    assert f"{q_proj}.masm_U.default.4" not in state
    other = get_peft_model(tiny_vit(), _config(**target))
    result = other.load_state_dict(state, strict=False)
    assert not [key for key in result.unexpected_keys if "masm_" in key]
    assert not [key for key in result.missing_keys if "masm_" in key]
    for mine, theirs in zip(_layers(trained), _layers(other)):
        for a, b in zip(mine.factors("default"), theirs.factors("default")):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(output_of(other, pixels), output_of(trained, pixels))
    assert other.state_dict().keys() == state.keys()


def test_a_saved_adapter_has_the_per_subspace_file_format(tmp_path, pixels):
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    q_proj = _first_layer_key(model)
    assert sorted(k for k in saved if k.startswith(f"{q_proj}.masm_V.")) == [
        f"{q_proj}.masm_V.{j}" for j in range(4)
    ]
    assert saved[f"{q_proj}.masm_V.3"].shape == (32, 2)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert _trainable_per_layer(loaded) == {0}  # inference mode; the layout itself:
    assert {len(layer.masm_U["default"]) for layer in _layers(loaded)} == {1}
    torch.testing.assert_close(output_of(loaded, pixels), output_of(model, pixels))


def test_a_subspace_mask_on_a_model_built_without_one_says_what_to_do():
    model = get_peft_model(tiny_vit(), _config())
    model.peft_config["default"].layer_mask = "dynamic"
    model.peft_config["default"].mask_granularity = "subspace"
    with pytest.raises(ValueError, match="before get_peft_model"):
        _ = model.base_model.layer_mask


def _train(model, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = TrainingStep(model, optimizer, lambda m, batch: m(**batch).loss)
    for i in range(steps):
        step(image_batch(i))


def test_the_layer_mask_trains_the_same_in_either_layout():
    """A whole-layer mask over one tensor per factor, against the same mask over K tensors per factor."""
    options = {
        "layer_mask": "dynamic",
        "mask_warmup": 2,
        "mask_interval": 2,
        "mask_keep_ratio": 0.5,
        "fit_bound": 0.05,  # so that the projection acts too
        "orthogonality_weight": 0.1,
        "spectral_weight": 0.1,
        "modules_to_save": ["classifier"],
    }
    joined = get_peft_model(tiny_vit_classifier(), _config(**options))
    split = get_peft_model(tiny_vit_classifier(), _config(**{**options, "mask_granularity": "subspace"}))
    split.peft_config["default"].mask_granularity = "layer"  # per-subspace tensors, whole-layer units
    assert _trainable_per_layer(split) == {12}
    _train(joined, 7)
    _train(split, 7)
    assert joined.base_model.layer_mask.history_masks == split.base_model.layer_mask.history_masks
    assert 0 < sum(joined.base_model.layer_mask.history_masks[-1]) < len(_layers(joined))
    for a_layer, b_layer in zip(_layers(joined), _layers(split)):
        for a, b in zip(a_layer.factors("default"), b_layer.factors("default")):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_statistics_saved_for_the_other_layout_are_refused_with_a_clear_error():
    """A checkpoint from before one-tensor-per-factor holds per-subspace gradient statistics."""
    options = {"layer_mask": "dynamic", "modules_to_save": ["classifier"]}
    old = get_peft_model(tiny_vit_classifier(), _config(**options, mask_granularity="subspace"))
    old.peft_config["default"].mask_granularity = "layer"  # what a whole-layer mask over K tensors saved
    _train(old, 1)
    state = old.base_model.layer_mask.state_dict()
    new = get_peft_model(tiny_vit_classifier(), _config(**options))
    with pytest.raises(ValueError, match="another layout of the factor tensors"):
        new.base_model.layer_mask.load_state_dict(state)
    same = get_peft_model(tiny_vit_classifier(), _config(**options))
    _train(same, 1)
    new.base_model.layer_mask.load_state_dict(same.base_model.layer_mask.state_dict())
    assert new.base_model.layer_mask.num_updates == 1


def test_the_per_step_stack_makes_no_tensor_from_python_floats_after_the_first_step(monkeypatch):
    """The fit bound and the regularisers need each layer's scale as a tensor; made from Python floats at every
    step, that is a blocking host-to-device copy on a GPU (it waits for every queued kernel). They are made once."""
    model = get_peft_model(tiny_vit(), _config(orthogonality_weight=0.1, spectral_weight=0.1))
    masm = model.base_model
    masm.apply_fit_bound()
    first = masm.regularization_loss()["total"]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called in a training step after the first")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "tensor", refuse)
        masm.apply_fit_bound()
        again = masm.regularization_loss()["total"]
    torch.testing.assert_close(again, first)


def test_the_kept_list_of_layers_follows_adapters_added_and_deleted():
    """``masm_layers`` keeps its list between steps (walking the module tree every step cost ~2 ms of Python on a
    ViT-L/14), and must still see every change of adapters."""
    model = get_peft_model(tiny_vit(), _config())
    masm = model.base_model
    count = len(list(masm.masm_layers("default")))
    assert count > 0 and list(masm.masm_layers("other")) == []
    model.add_adapter("other", _config(target_modules=["q_proj"]))
    assert 0 < len(list(masm.masm_layers("other"))) < count
    model.delete_adapter("other")
    assert list(masm.masm_layers("other")) == []
    assert len(list(masm.masm_layers("default"))) == count
