"""Issue 10: an adapter on the wrong model, broken or newer files, the model card, unsupported PEFT calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import peft_masm
from peft_masm import BaseModelMismatchError, IncompleteAdapterFileError, MASMConfig

from .conftest import SIZES


def _vit(layers: int = 2, seed: int = 0) -> ViTForImageClassification:
    """A tiny ViT; models with more layers share the first two with the 2-layer one (same fingerprints)."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**SIZES | {"num_hidden_layers": layers}, num_labels=2)).eval()
    if layers != 2:
        model.load_state_dict(_vit(2, seed).state_dict(), strict=False)
    return model


def _saved_adapter(folder: Path, base=None) -> Path:
    model = get_peft_model(
        base if base is not None else _vit(),
        MASMConfig(num_subspaces=2, subspace_rank=2, modules_to_save=["classifier"], init_weights=False),
    )
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------- wrong model


def test_adapter_records_the_model_type(tmp_path):
    config = json.loads((_saved_adapter(tmp_path) / "adapter_config.json").read_text())
    assert config["base_model_type"] == "vit"
    assert config["peft_masm_version"] == peft_masm.__version__


@pytest.mark.parametrize(
    "other",
    [
        lambda: DeiTForImageClassification(DeiTConfig(**SIZES, num_labels=2)),
        lambda: CLIPVisionModel(CLIPVisionConfig(**SIZES)),
    ],
    ids=["deit", "clip"],
)
def test_vit_adapter_onto_another_architecture_is_refused(tmp_path, other):
    folder = _saved_adapter(tmp_path)
    with pytest.raises(BaseModelMismatchError, match=r"trained on a model of type 'vit'"):
        PeftModel.from_pretrained(other(), folder)
    with pytest.raises(BaseModelMismatchError, match=r"trained on a model of type 'vit'"):
        PeftModel.from_pretrained(other(), folder, is_trainable=True)


def test_same_keys_other_type_is_refused_by_type(tmp_path):
    """ViTModel and DeiTModel name their layers alike: only the recorded model_type tells them apart."""
    from transformers import DeiTModel

    torch.manual_seed(0)
    folder = _saved_adapter(tmp_path, ViTModel(ViTConfig(**SIZES)))
    deit = DeiTModel(DeiTConfig(**SIZES))
    with pytest.raises(BaseModelMismatchError, match=r"type 'vit'.*DeiTModel of type 'deit'"):
        PeftModel.from_pretrained(deit, folder)


def test_missing_target_layers_are_refused(tmp_path):
    """Same model type, more layers: the extra MASM targets would stay untrained, with no error until now."""
    folder = _saved_adapter(tmp_path, _vit(layers=2))
    with pytest.raises(
        BaseModelMismatchError, match=r"4 target layer\(s\) of this model have no saved weights"
    ):
        PeftModel.from_pretrained(_vit(layers=3), folder)


def test_saved_layers_the_model_lacks_are_refused(tmp_path):
    folder = _saved_adapter(tmp_path, _vit(layers=3))
    with pytest.raises(
        BaseModelMismatchError, match=r"4 saved layer\(s\) are not MASM targets of this model"
    ):
        PeftModel.from_pretrained(_vit(layers=2), folder)


def test_the_right_model_still_loads_and_the_fingerprint_check_stays(tmp_path, pixels):
    folder = _saved_adapter(tmp_path)
    loaded = PeftModel.from_pretrained(_vit(), folder)
    assert loaded(pixel_values=pixels).logits.shape == (2, 2)
    with pytest.raises(BaseModelMismatchError, match="differs from the fingerprint"):
        PeftModel.from_pretrained(_vit(seed=1), folder)


def test_a_reused_config_records_the_model_it_was_last_used_on(tmp_path):
    config = MASMConfig(num_subspaces=2, subspace_rank=2, target_modules=["q_proj", "v_proj"])
    get_peft_model(_vit(), config)
    torch.manual_seed(0)
    deit = get_peft_model(DeiTForImageClassification(DeiTConfig(**SIZES, num_labels=2)), config)
    deit.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_type"] == "deit"


# ---------------------------------------------------------------------------------- broken files


def test_truncated_weights_name_the_file(tmp_path):
    folder = _saved_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompleteAdapterFileError, match=r"adapter_model\.safetensors is incomplete"):
        PeftModel.from_pretrained(_vit(), folder)
    weights.write_bytes(data[:5])
    with pytest.raises(IncompleteAdapterFileError, match="no header"):
        PeftModel.from_pretrained(_vit(), folder)


@pytest.mark.parametrize("form", ["absolute", "path", "relative", "load_adapter"])
def test_a_folder_without_its_weights_names_the_missing_file(tmp_path, monkeypatch, form):
    """Issue 26: was HFValidationError about repo ids (absolute path), or, offline, LocalEntryNotFoundError
    about disabled outgoing traffic (a relative name, which is also a valid Hub id)."""
    import huggingface_hub.constants

    folder = _saved_adapter(tmp_path / "adapter")
    (folder / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network, fixed or not
    monkeypatch.chdir(tmp_path)
    where = {"absolute": str(folder), "path": folder, "relative": "adapter", "load_adapter": folder}[form]
    with pytest.raises(FileNotFoundError) as info:
        if form == "load_adapter":
            get_peft_model(_vit(), MASMConfig(num_subspaces=2, subspace_rank=2)).load_adapter(where, "second")
        else:
            PeftModel.from_pretrained(_vit(), where)
    message = str(info.value)
    assert isinstance(info.value, peft_masm.tuner.files.AdapterWeightsNotFoundError)
    assert "has no adapter_model.safetensors (it holds: README.md, adapter_config.json)" in message
    assert f"The adapter folder {'adapter' if form == 'relative' else folder} has no" in message
    assert "copy adapter_model.safetensors into that folder, or save the adapter again" in message


def test_a_config_saved_alone_still_reads_and_starts_a_new_adapter(tmp_path):
    """The missing-weights error is for loading an adapter: a config on its own is still a config."""
    MASMConfig(num_subspaces=2, subspace_rank=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = MASMConfig.from_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).num_subspaces == 2
    config.inference_mode = False  # saved in inference mode; a new adapter trains
    model = get_peft_model(_vit(), config)
    assert model.base_model.decompose() == 0  # decomposed at injection: a new adapter, nothing to load


def test_an_adapter_saved_in_peft_s_pickle_format_still_loads(tmp_path, pixels):
    model = get_peft_model(_vit(), MASMConfig(num_subspaces=2, subspace_rank=2, init_weights=False)).eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(_vit(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"num_subspaces": 3}, r"has num_subspaces=3 \(the saved weights have 2\); set"),
        # lowered: PEFT renames only the keys the smaller model has, so K is read from the saved s0 (issue 26)
        ({"num_subspaces": 1}, r"has num_subspaces=1 \(the saved weights have 2\); set"),
        ({"subspace_rank": 1}, r"has subspace_rank=1 \(the saved weights have 2\); set"),
        ({"subspace_rank": 3}, r"has subspace_rank=3 \(the saved weights have 2\); set"),
        (
            {"num_subspaces": 1, "subspace_rank": 4},  # the same K*k: only the field names tell
            r"num_subspaces=1 \(the saved weights have 2\) and subspace_rank=4 \(the saved weights have 2\)",
        ),
    ],
    ids=["K-raised", "K-lowered", "k-lowered", "k-raised", "K-and-k"],
)
@pytest.mark.parametrize("per_subspace", [False, True], ids=["one-tensor", "per-subspace"])
def test_shape_fields_that_disagree_with_the_weights_are_named(tmp_path, edits, message, per_subspace):
    layout = {"layer_mask": "dynamic", "mask_granularity": "subspace"} if per_subspace else {}
    model = get_peft_model(_vit(), MASMConfig(num_subspaces=2, subspace_rank=2, init_weights=False, **layout))
    q_proj = model.base_model.model.vit.layers[0].attention.q_proj
    assert len(q_proj.masm_s["default"]) == (2 if per_subspace else 1)  # the layout this case is about
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | edits))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(_vit(), tmp_path)


def test_adapter_from_a_newer_version_says_what_to_install(tmp_path):
    folder = _saved_adapter(tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_masm_version"] = "99.1.0"
    config["a_field_from_the_future"] = 1
    config_path.write_text(json.dumps(config))
    expected = r"saved by peft_masm 99\.1\.0, newer than the installed .*pip install -U 'peft_masm>=99\.1\.0'"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(_vit(), folder)
    with pytest.raises(ValueError, match=expected):
        PeftConfig.from_pretrained(str(folder))  # PEFT's generic loader too


# ---------------------------------------------------------------------------------- model card


def test_save_pretrained_writes_the_masm_model_card(tmp_path):
    card = (_saved_adapter(tmp_path) / "README.md").read_text()
    assert "import peft_masm" in card and "MASM" in card
    assert "[More Information Needed]" not in card  # PEFT's blank template is gone
    assert "library_name: peft" in card


def test_save_pretrained_keeps_a_card_the_user_wrote(tmp_path):
    (tmp_path / "README.md").write_text("# My detector\n\nNotes I wrote myself.\n")
    card = (_saved_adapter(tmp_path) / "README.md").read_text()
    assert "Notes I wrote myself." in card


def test_a_config_saved_alone_writes_no_card(tmp_path):
    MASMConfig().save_pretrained(str(tmp_path))
    assert not (tmp_path / "README.md").exists()


# ---------------------------------------------------------------------------------- PEFT helpers


def test_add_weighted_adapter_is_not_supported():
    model = get_peft_model(_vit(), MASMConfig(num_subspaces=2, subspace_rank=2))
    with pytest.raises(NotImplementedError, match="MASM does not support add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(NotImplementedError, match="subtract_mutated_init"):
        model.subtract_mutated_init({}, "default")


# ---------------------------------------------------------------------------------- non-finite weights


def test_decomposing_a_non_finite_weight_names_the_layer():
    vit = _vit()
    with torch.no_grad():
        vit.vit.layers[1].attention.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'vit\.layers\.1\.attention\.v_proj' holds 1 NaN/inf values"):
        get_peft_model(vit, MASMConfig(num_subspaces=2, subspace_rank=2))
