"""Tiny stand-ins for the packaged backbones of ``peft_masm.backbones`` (made by the tests, offline)."""

from __future__ import annotations

from pathlib import Path

# A 2-block CLIP vision tower at 32 px: the tiny backbone of the tests that need a CLIP.
TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


def save_packaged_like_clip(cache: str | Path, alias: str = "clip-vit-b16", seed: int = 0) -> Path:
    """A tiny vision-only CLIP (32 px) where ``prepare(alias)`` with ``PEFT_MASM_CACHE=cache`` finds a built
    backbone, laid out as ``peft_masm.backbones.clip_onnx`` writes one: a full ``CLIPConfig``, the weights of a
    ``CLIPVisionModelWithProjection`` (no classifier; a ``visual_projection`` the image classifier does not use)
    and a ``CLIPImageProcessor``. Returns the backbone folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPConfig(vision_config=TINY_CLIP_VISION, projection_dim=16)
    config.architectures = ["CLIPVisionModelWithProjection"]
    out = Path(cache) / "backbones" / alias
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(out)
    config.save_pretrained(out)  # replaces the vision-only config.json, as the converter writes a CLIPConfig
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out
