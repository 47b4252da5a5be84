"""Convert an INT8 dynamically-quantised CLIP vision ONNX (HF parameter names kept) to a HF directory.

Float initialisers already carry HF names (``vision_model.*``). Quantised ``MatMul`` weights are
anonymous (``onnx::MatMul_N_quantized`` + ``_scale`` + ``_zero_point``, per output channel, stored
(in, out)); their module is read from the consuming ``MatMulInteger`` node's name, e.g.
``/vision_model/encoder/layers.0/self_attn/q_proj/MatMul_quant`` -> ``...q_proj.weight``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["onnx_clip_state_dict", "convert_clip_onnx", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_NODE = re.compile(r"^/(?P<path>.+)/MatMul(?:_quant)?$")


def _dequantise(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """(q - zero_point) * scale with per-output-channel (last axis) or per-tensor parameters."""
    return (q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


def _module_name(node_name: str) -> str:
    m = _NODE.match(node_name)
    if m is None:
        raise ValueError(f"cannot map ONNX node {node_name!r} to a module (expected '/a/b/c/MatMul_quant')")
    return m.group("path").replace("/", ".")


def onnx_clip_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """HF ``CLIPVisionModelWithProjection`` state dict from the quantised ONNX graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("vision_model.") or name.startswith("visual_projection."):
            sd[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "MatMul"):
            continue
        w = node.input[1]
        if node.op_type == "MatMul":
            if w not in inits or w.startswith("vision_model."):
                continue  # activations x activations (attention) or already named
            weight = inits[w].astype(np.float32)
        else:
            if not w.endswith("_quantized"):
                raise ValueError(
                    f"{onnx_path}: MatMulInteger {node.name} weight {w!r} is not a quantised initialiser"
                )
            stem = w[: -len("_quantized")]
            weight = _dequantise(inits[w], inits[f"{stem}_scale"], inits[f"{stem}_zero_point"])
        key = _module_name(node.name) + ".weight"
        if key in sd:
            raise ValueError(f"{onnx_path}: two MatMul weights map to {key}")
        sd[key] = torch.from_numpy(np.ascontiguousarray(weight.T))  # ONNX (in, out) -> nn.Linear (out, in)
    return sd


def _config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None):
    from transformers import CLIPConfig

    hidden = sd["vision_model.embeddings.class_embedding"].shape[0]
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    inter = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    proj = sd["visual_projection.weight"].shape[0]
    image = int(round((n_pos - 1) ** 0.5)) * patch
    heads = num_heads or max(1, hidden // 64)
    vision = dict(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=image,
        projection_dim=proj,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPConfig(vision_config=vision, projection_dim=proj)


def convert_clip_onnx(onnx_path: str | Path, out_dir: str | Path, num_heads: int | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` to ``out_dir``.

    The config is a full ``CLIPConfig`` (``model_type="clip"``) holding the real vision config:
    ``CLIPVisionModel``/``CLIPVisionModelWithProjection`` read its ``vision_config``, and
    ``AutoModelForImageClassification`` maps ``clip`` (not ``clip_vision_model``) to
    ``CLIPForImageClassification``. The text tower is absent: do not load it with ``CLIPModel``.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = onnx_clip_state_dict(onnx_path)
    config = _config_from_state_dict(sd, num_heads)
    model = CLIPVisionModelWithProjection(config.vision_config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{onnx_path}: state dict does not match CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    config.architectures = ["CLIPVisionModelWithProjection"]
    config.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    size = config.vision_config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(out)
    return out
