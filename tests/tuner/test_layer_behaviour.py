import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_masm
from peft_masm import MASMConfig
from peft_masm.tuner.layer import MASMLayer

from .conftest import MODEL_FACTORIES, output_of, tiny_clip, tiny_vit


def _config(**kwargs) -> MASMConfig:
    return MASMConfig(**{"num_subspaces": 2, "subspace_rank": 2, **kwargs})


def _layers(model) -> list[MASMLayer]:
    return [m for m in model.modules() if isinstance(m, MASMLayer)]


def _kept_A(layer: MASMLayer, adapter_name: str = "default") -> torch.Tensor:
    """The A factor the layer keeps for forwards without autograd."""
    return layer._masm_state[adapter_name].inference.A


@pytest.mark.parametrize("kind", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("partition", ["contiguous", "interleaved"])
def test_identity_at_initialisation(kind, partition, pixels):
    base = MODEL_FACTORIES[kind]()
    expected = output_of(base, pixels)
    model = get_peft_model(base, _config(partition=partition))
    torch.testing.assert_close(output_of(model, pixels), expected, atol=1e-6, rtol=1e-5)


def test_non_identity_start(pixels):
    base = tiny_clip()
    expected = output_of(base, pixels)
    model = get_peft_model(base, _config(init_weights=False))
    assert not torch.allclose(output_of(model, pixels), expected, atol=1e-4)


def test_partitions_hold_the_expected_triplets():
    model = get_peft_model(tiny_clip(), _config(num_subspaces=3, subspace_rank=2, partition="interleaved"))
    model.base_model.decompose()
    layer = _layers(model)[0]
    s0 = layer.masm_s0["default"]
    # minor triplets in descending order t0 > t1 > ... > t5; interleaved: subspace j holds t_j and t_{j+3}
    ordered = torch.sort(s0, descending=True).values
    assert torch.equal(s0, ordered[[0, 3, 1, 4, 2, 5]])
    weight = layer.get_base_layer().weight.double()
    svals = torch.linalg.svdvals(weight)
    torch.testing.assert_close(ordered.double(), svals[-6:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.masm_sigma_r["default"][0].double(), svals[-7], atol=1e-6, rtol=1e-5)


def test_forward_uses_the_factored_product_only(pixels, monkeypatch):
    model = get_peft_model(tiny_clip(), _config(init_weights=False))
    model.base_model.decompose()

    def no_dense(*args, **kwargs):
        raise AssertionError("a dense m x n delta was formed in the forward")

    monkeypatch.setattr(MASMLayer, "get_delta_weight", no_dense)
    output_of(model, pixels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, pixels):
    base = tiny_clip().to(dtype)
    expected = output_of(base, pixels.to(dtype))
    model = get_peft_model(base, _config())
    out = output_of(model, pixels.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    layer = _layers(model)[0]
    assert layer.masm_U["default"][0].dtype == torch.float32  # factors stay float32
    # the SVD ran in float64 on the half-precision weight: singular values match
    weight = layer.get_base_layer().weight.double()
    torch.testing.assert_close(
        torch.sort(layer.masm_s0["default"].double()).values,
        torch.linalg.svdvals(weight)[-4:].flip(0),
        atol=1e-5,
        rtol=1e-4,
    )


def test_merge_unmerge_and_merge_and_unload(pixels):
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    adapted = output_of(model, pixels)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, pixels), adapted, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, pixels), adapted, atol=1e-5, rtol=1e-4)
    for layer in _layers(model):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(output_of(model, pixels), adapted, atol=1e-5, rtol=1e-4)
    for layer in _layers(model):
        layer.unmerge()
    merged = model.merge_and_unload()
    assert not _layers(merged)
    torch.testing.assert_close(output_of(merged, pixels), adapted, atol=1e-5, rtol=1e-4)


def test_safe_merge_refuses_nans():
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.masm_s["default"][0].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)


def test_disable_several_and_delete_adapters(pixels):
    base = tiny_vit()
    expected = output_of(base, pixels)
    model = get_peft_model(base, _config(init_weights=False))
    model.add_adapter("other", _config(init_weights=False, num_subspaces=1))
    only_default = output_of(model, pixels)
    model.set_adapter("other")
    only_other = output_of(model, pixels)
    assert not torch.allclose(only_default, only_other)
    model.base_model.set_adapter(["default", "other"])
    assert not torch.allclose(output_of(model, pixels), only_default)
    # in one layer, the deltas of several active adapters add up
    layer = _layers(model)[0]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        delta = x @ (layer.get_delta_weight("default") + layer.get_delta_weight("other")).T
        torch.testing.assert_close(layer(x), base_out + delta, atol=1e-6, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(output_of(model, pixels), expected)
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert all("other" not in layer.masm_U and "other" not in layer.masm_U0 for layer in _layers(model))
    torch.testing.assert_close(output_of(model, pixels), only_default)


def test_train_factors_freeze_the_others():
    model = get_peft_model(tiny_vit(), _config(train_factors="singular_values"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".masm_s." in n for n in names if "masm_" in n)
    model.base_model.set_adapter("default")  # PEFT re-enables grads here; MASM's frozen names survive it
    names = {n for n, p in model.named_parameters() if p.requires_grad and "masm_" in n}
    assert all(".masm_s." in n for n in names)


def test_gradients_reach_every_factor(pixels):
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    model.train()
    model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss.backward()
    for layer in _layers(model):
        for factors in (layer.masm_U, layer.masm_s, layer.masm_V):
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in factors["default"])


def test_no_svd_when_loading(tmp_path, pixels, monkeypatch):
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    trained = output_of(model, pixels)
    model.save_pretrained(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading ran an SVD")

    monkeypatch.setattr("peft_masm.tuner.decomposition.minor_triplets", forbidden)
    monkeypatch.setattr("peft_masm.tuner.model.minor_triplets_many", forbidden)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    torch.testing.assert_close(output_of(loaded, pixels), trained)
    assert loaded.base_model.decompose() == 0


def test_adapter_from_another_base_model_is_refused(tmp_path):
    model = get_peft_model(tiny_vit(seed=0), _config())
    model.base_model.decompose()
    model.save_pretrained(tmp_path)
    with pytest.raises(
        peft_masm.BaseModelMismatchError, match=r"layer 'vit\.layers\.0\.attention\.[qkvo]_proj'"
    ):
        PeftModel.from_pretrained(tiny_vit(seed=1), tmp_path)


def test_adapter_loads_onto_a_bfloat16_copy_of_its_base(tmp_path, pixels):
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    model.base_model.decompose()
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(tiny_vit().to(torch.bfloat16), tmp_path)  # no mismatch error


def test_unused_adapter_saves_and_reloads_as_identity(tmp_path, pixels):
    base = tiny_vit()
    expected = output_of(base, pixels)
    get_peft_model(base, _config()).save_pretrained(tmp_path)  # never run: placeholders are saved
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    torch.testing.assert_close(output_of(loaded, pixels), expected, atol=1e-6, rtol=1e-5)
    assert all(not layer.pending_decomposition("default") for layer in _layers(loaded))  # decomposed on use


def test_inference_reuses_the_delta_factors_until_a_factor_changes(pixels, tmp_path):
    """Without autograd the (A, B) factors are built once; an optimizer step, a load or a device move rebuilds
    them, so cached inference always equals a fresh forward."""
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    layer = _layers(model)[0]
    first = output_of(model, pixels)
    cached_A = _kept_A(layer)
    output_of(model, pixels)
    assert _kept_A(layer) is cached_A  # reused, not rebuilt

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(pixel_values=pixels).logits.sum().backward()
    optimizer.step()
    stepped = output_of(model, pixels)
    assert _kept_A(layer) is not cached_A
    assert not torch.allclose(stepped, first)
    with torch.enable_grad():  # the autograd path never reads the cache
        fresh = model(pixel_values=pixels).logits.detach()
    torch.testing.assert_close(stepped, fresh)

    model.save_pretrained(tmp_path / "stepped")
    reloaded = get_peft_model(tiny_vit(), _config(init_weights=False))
    output_of(reloaded, pixels)  # fills the cache with the random start
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(reloaded, load_file(tmp_path / "stepped" / "adapter_model.safetensors"))
    torch.testing.assert_close(output_of(reloaded, pixels), stepped)
    torch.testing.assert_close(output_of(model.to(torch.float64).to(torch.float32), pixels), stepped)


def test_the_frozen_half_is_a_buffer_made_with_the_factors(pixels):
    """The frozen half of B (-U0 diag(s0)) is the non-persistent buffer masm_B0, made where the factors are set,
    not in any forward; a load (in place, or replacing the buffers), one inside inference mode included, and a
    dtype move give it anew, so a forward with autograd always equals a fresh model's. It is never saved."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    def grad_forward(model, x=pixels):
        with torch.enable_grad():
            return model(pixel_values=x).logits.detach()

    # An adapter whose frozen starting values differ from a fresh decomposition's.
    state = get_peft_model_state_dict(get_peft_model(tiny_vit(seed=1), _config(init_weights=False)))
    state = {k: v * 100 if k.endswith(".masm_s0") else v for k, v in state.items()}
    assert not any("masm_B0" in key or "masm_rho" in key for key in state)
    never_run = get_peft_model(tiny_vit(seed=1), _config())
    set_peft_model_state_dict(never_run, state)
    expected = grad_forward(never_run)

    model = get_peft_model(tiny_vit(seed=1), _config())
    layer = _layers(model)[0]
    half = layer.masm_B0["default"]
    torch.testing.assert_close(half, -layer.masm_U0["default"] * layer.masm_s0["default"], atol=0, rtol=0)
    before = grad_forward(model)
    assert layer.masm_B0["default"] is half  # a forward makes nothing
    assert not torch.allclose(expected, before)

    # In place: the buffers keep their objects; made inside inference mode, it must still serve autograd.
    with torch.inference_mode():
        set_peft_model_state_dict(model, state)
    assert not layer.masm_B0["default"].is_inference()
    torch.testing.assert_close(grad_forward(model), expected)

    # Replaced: loading with assign=True puts new tensors in the buffer dicts.
    assigned = get_peft_model(tiny_vit(seed=1), _config())
    grad_forward(assigned)
    set_peft_model_state_dict(assigned, state, low_cpu_mem_usage=True)
    torch.testing.assert_close(grad_forward(assigned), expected)

    doubled = model.to(torch.float64)
    out = grad_forward(doubled, pixels.double())
    assert layer.masm_B0["default"].dtype == torch.float64
    torch.testing.assert_close(out, expected.double(), atol=1e-5, rtol=1e-4)


def test_deleting_an_adapter_drops_what_the_layer_kept_of_it(pixels):
    model = get_peft_model(tiny_vit(), _config())
    model.add_adapter("other", _config(init_weights=False))
    model.set_adapter("other")
    output_of(model, pixels)
    layer = _layers(model)[0]
    assert layer._masm_state["other"].inference is not None
    assert "other" in layer.masm_B0 and "other" in layer.masm_rho
    model.delete_adapter("other")
    assert "other" not in layer._masm_state
    assert not any("other" in buffers for buffers in (layer.masm_B0, layer.masm_rho, layer.masm_U0))


def test_inference_under_autocast_keeps_the_delta_factors_in_its_dtype(pixels):
    """Inside torch.autocast, inference keeps (A, B) cast once to the autocast dtype: the same outputs as the
    autograd path, whose products autocast casts at every forward; leaving autocast rebuilds them in float32."""
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    layer = _layers(model)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = output_of(model, pixels)
        assert _kept_A(layer).dtype == torch.bfloat16
        assert output_of(model, pixels).equal(cached)  # reused
        with torch.enable_grad():
            expected = model(pixel_values=pixels).logits.detach()
    torch.testing.assert_close(cached, expected, atol=0, rtol=0)
    full = output_of(model, pixels)
    assert _kept_A(layer).dtype == torch.float32
    with torch.enable_grad():
        torch.testing.assert_close(full, model(pixel_values=pixels).logits.detach())


def test_merging_inside_autocast_uses_the_float32_delta():
    """A merge (or LoRA export) inside torch.autocast computes the dense delta in float32, as outside it."""
    model = get_peft_model(tiny_vit(), _config(init_weights=False))
    layer = _layers(model)[0]
    expected = layer.get_delta_weight("default")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = layer.get_delta_weight("default")
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, expected, atol=0, rtol=0)
