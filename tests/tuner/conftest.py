"""Tiny HF vision models built from configs (no downloads) for the tuner tests."""

from __future__ import annotations

import pytest
import torch
from tiny_training import SIZES
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)

import peft_masm  # noqa: F401  (registers MASM)


def tiny_clip(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**SIZES)).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**SIZES, num_labels=2)).eval()


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**SIZES)).eval()


MODEL_FACTORIES = {"clip": tiny_clip, "vit": tiny_vit, "dinov2": tiny_dinov2}


def output_of(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """A single tensor from any of the tiny models."""
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
