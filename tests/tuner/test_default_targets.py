"""Every model type in MASM's default-target table, on a tiny config: inject, train, save, reload, merge.

The table (``DEFAULT_ATTENTION_TARGETS``) and the "Default targets" table of docs/method.md must list the same model
types, and every entry must be exercised here: a default that wraps a module its parent never calls
(SigLIP's pooling head, an ``nn.MultiheadAttention``) trains nothing but still merges, which
``merged == unmerged`` after training catches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model
from tiny_training import SIZES as VIT_SIZES
from torch import nn

from peft_masm import MASMConfig
from peft_masm.tuner import DEFAULT_ATTENTION_TARGETS, DEFAULT_MLP_TARGETS, default_target_modules

ROOT = Path(__file__).resolve().parents[2]
TEXT_SIZES = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=99
)


def _vision(config_cls, model_cls, **extra) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(**VIT_SIZES, **extra))


def _dual(config_cls, model_cls) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(text_config=dict(TEXT_SIZES), vision_config=dict(VIT_SIZES)))


# model_type -> (tiny model, the name endings its attention targets must have)
QKVO = {"q_proj", "k_proj", "v_proj", "o_proj"}
QKV_OUT = {"q_proj", "k_proj", "v_proj", "out_proj"}
CASES: dict[str, tuple[Callable[[], nn.Module], set[str]]] = {
    "clip_vision_model": (_vision(tf.CLIPVisionConfig, tf.CLIPVisionModel), QKV_OUT),
    "clip": (_dual(tf.CLIPConfig, tf.CLIPModel), QKV_OUT),
    "siglip_vision_model": (_vision(tf.SiglipVisionConfig, tf.SiglipVisionModel), QKV_OUT),
    "siglip": (_dual(tf.SiglipConfig, tf.SiglipModel), QKV_OUT),
    "siglip2_vision_model": (
        lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**VIT_SIZES | {"num_patches": 16})),
        QKV_OUT,
    ),
    "siglip2": (
        lambda: tf.Siglip2Model(
            tf.Siglip2Config(text_config=dict(TEXT_SIZES), vision_config=VIT_SIZES | {"num_patches": 16})
        ),
        QKV_OUT,
    ),
    "vit": (_vision(tf.ViTConfig, tf.ViTForImageClassification, num_labels=2), QKVO),
    "deit": (_vision(tf.DeiTConfig, tf.DeiTForImageClassification, num_labels=2), QKVO),
    "beit": (_vision(tf.BeitConfig, tf.BeitForImageClassification, num_labels=2), QKVO),
    "vit_mae": (_vision(tf.ViTMAEConfig, tf.ViTMAEModel, mask_ratio=0.0), QKVO),
    "vit_msn": (_vision(tf.ViTMSNConfig, tf.ViTMSNForImageClassification, num_labels=2), QKVO),
    "ijepa": (_vision(tf.IJepaConfig, tf.IJepaForImageClassification, num_labels=2), QKVO),
    "dinov2": (_vision(tf.Dinov2Config, tf.Dinov2ForImageClassification, num_labels=2), QKVO),
    "dinov2_with_registers": (
        _vision(tf.Dinov2WithRegistersConfig, tf.Dinov2WithRegistersForImageClassification, num_labels=2),
        QKVO,
    ),
    "dinov3_vit": (_vision(tf.DINOv3ViTConfig, tf.DINOv3ViTModel), QKVO),
    "swin": (
        lambda: tf.SwinForImageClassification(
            tf.SwinConfig(
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 2],
                image_size=32,
                patch_size=4,
                window_size=2,
                num_labels=2,
            )
        ),
        QKVO,
    ),
    "data2vec-vision": (
        _vision(tf.Data2VecVisionConfig, tf.Data2VecVisionForImageClassification, num_labels=2),
        {"query", "key", "value", "dense"},
    ),
    "hiera": (
        lambda: tf.HieraForImageClassification(
            tf.HieraConfig(
                embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], num_query_pool=2, num_labels=2
            )
        ),
        {"qkv", "proj"},
    ),
}


def _pixels(model: nn.Module) -> torch.Tensor:
    config = getattr(model.config, "vision_config", model.config)
    size = config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def _inputs(model_type: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if model_type.startswith("siglip2"):
        # SigLIP 2 takes pre-patchified pixels with their attention mask and grid shape.
        patch = 8
        patches = torch.randn(2, 16, 3 * patch * patch, generator=torch.Generator().manual_seed(3))
        return {
            "pixel_values": patches,
            "pixel_attention_mask": torch.ones(2, 16, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4], [4, 4]]),
        }
    return {"pixel_values": _pixels(model)}


def _output(model: nn.Module, model_type: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One tensor from the vision path (the image features of a dual CLIP/SigLIP model)."""
    torch.manual_seed(0)  # ViTMAE shuffles its patches with torch's global generator
    if model_type in ("clip", "siglip", "siglip2"):
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        features = base.get_image_features(**inputs)
        return features.pooler_output if hasattr(features, "pooler_output") else features
    out = model(**inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state


def test_every_default_model_type_has_a_case_and_a_docs_row():
    assert set(CASES) == set(DEFAULT_ATTENTION_TARGETS) == set(DEFAULT_MLP_TARGETS)
    docs = (ROOT / "docs" / "method.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9_-]+)` \|", docs, flags=re.M))
    assert set(DEFAULT_ATTENTION_TARGETS) <= rows, sorted(set(DEFAULT_ATTENTION_TARGETS) - rows)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_defaults_inject_train_save_reload_and_merge(model_type, tmp_path):
    factory, endings = CASES[model_type]
    torch.manual_seed(0)
    base = factory().eval()
    assert base.config.model_type == model_type
    config = MASMConfig(num_subspaces=2, subspace_rank=2, orthogonality_weight=0.1, spectral_weight=0.1)
    model = get_peft_model(base, config)
    layers = dict(model.base_model.masm_layers())
    assert layers, model_type
    assert {name.rsplit(".", 1)[1] for name in layers} <= endings
    assert all("text" not in name and "head" not in name for name in layers)  # vision encoder only
    assert not any(
        isinstance(parent, nn.MultiheadAttention)
        for parent in model.modules()
        for child in parent.children()
        if child in layers.values()
    )

    inputs = _inputs(model_type, base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = (
            _output(model, model_type, inputs).square().mean()
            + model.base_model.regularization_loss()["total"]
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    grads_reached = [layer.masm_s["default"][0] for layer in layers.values()]
    assert all(
        not torch.equal(s, layer.masm_s0["default"][:2]) for s, layer in zip(grads_reached, layers.values())
    )

    with torch.no_grad():
        trained = _output(model, model_type, inputs)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(factory().eval(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(reloaded, model_type, inputs), trained, atol=1e-5, rtol=1e-4)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(_output(merged, model_type, inputs), trained, atol=1e-4, rtol=1e-3)


def test_include_mlp_targets_exist_for_every_model_type():
    for model_type, (factory, _) in CASES.items():
        torch.manual_seed(0)
        targets = default_target_modules(model_type, include_mlp=True)
        model = get_peft_model(
            factory(), MASMConfig(num_subspaces=2, subspace_rank=2, target_modules=targets)
        )
        names = [name for name, _ in model.base_model.masm_layers()]
        attention = [
            name
            for name, _ in get_peft_model(
                factory(), MASMConfig(num_subspaces=2, subspace_rank=2)
            ).base_model.masm_layers()
        ]
        assert len(names) > len(attention), model_type


def test_multihead_attention_out_proj_is_refused():
    """Issue 10: nn.MultiheadAttention reads out_proj.weight itself, so an adapter there would only merge."""
    torch.manual_seed(0)
    siglip = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VIT_SIZES))
    with pytest.raises(
        ValueError, match=r"head\.attention\.out_proj' is the output projection of an nn\.MultiheadAttention"
    ):
        get_peft_model(siglip, MASMConfig(num_subspaces=2, subspace_rank=2, target_modules=["out_proj"]))


def test_siglip_merged_equals_unmerged_after_regularised_training():
    """The bug of issue 10: with the old defaults, merged and unmerged pooler_output differed by 0.04."""
    torch.manual_seed(0)
    model = get_peft_model(
        tf.SiglipVisionModel(tf.SiglipVisionConfig(**VIT_SIZES)),
        MASMConfig(
            num_subspaces=2,
            subspace_rank=2,
            orthogonality_weight=1.0,
            spectral_weight=1.0,
            init_weights=False,
        ),
    )
    pixels = _pixels(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        loss = (
            model(pixel_values=pixels).pooler_output.square().mean()
            + model.base_model.regularization_loss()["total"]
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        unmerged = model(pixel_values=pixels).pooler_output
        merged = model.merge_and_unload()(pixel_values=pixels).pooler_output
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
