"""The scaled parametrisation of the singular values (issue: artifact subspaces that can learn).

The minor singular values of real backbones sit at 1e-4..1e-2 of the layer's RMS singular value rho, so
with raw singular values an Adam step of size lr barely moves a subspace. With ``subspace_alpha`` the
trainable offset is measured in units of ``subspace_alpha * rho``.
"""

import json

import pytest
import torch
from peft import get_peft_model

from peft_masm import MASMConfig
from peft_masm.tuner.layer import MASMLayer

from .conftest import tiny_vit


def _one_adam_step(config: MASMConfig, lr: float = 1e-3) -> list[tuple[float, torch.Tensor]]:
    model = get_peft_model(tiny_vit(), config)
    layers = [m for m in model.modules() if isinstance(m, MASMLayer)]
    before = [layer.factors("default")[1].detach().clone() for layer in layers]
    params = [p for n, p in model.named_parameters() if "masm_s." in n]
    optimizer = torch.optim.Adam(params, lr=lr, eps=1e-16)  # no eps damping of tiny gradients
    torch.manual_seed(0)
    model(pixel_values=torch.randn(2, 3, 32, 32)).logits.square().sum().backward()
    optimizer.step()
    return [
        (layer.reference_scale_value("default"), (layer.factors("default")[1].detach() - b).abs())
        for layer, b in zip(layers, before)
    ]


@pytest.mark.parametrize("alpha", [10.0, 100.0])
def test_a_step_moves_each_singular_value_by_alpha_rho_lr(alpha):
    """Adam's first step is lr * sign(gradient): the effective move is alpha * rho * lr, whatever s0 is."""
    config = MASMConfig(num_subspaces=2, subspace_rank=2, subspace_alpha=alpha, fit_constraint="none")
    for rho, moved in _one_adam_step(config):
        torch.testing.assert_close(moved, torch.full_like(moved, alpha * rho * 1e-3), rtol=1e-2, atol=1e-9)


def test_the_raw_parametrisation_moves_by_lr():
    config = MASMConfig(num_subspaces=2, subspace_rank=2, subspace_alpha=None, fit_constraint="none")
    for _, moved in _one_adam_step(config):
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-2, atol=1e-9)


def test_the_scaled_start_is_an_exact_identity():
    torch.manual_seed(0)
    base = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    expected = base(pixel_values=x).logits
    model = get_peft_model(base, MASMConfig(num_subspaces=2, subspace_rank=2))
    torch.testing.assert_close(model(pixel_values=x).logits, expected, atol=1e-6, rtol=1e-6)


def test_an_adapter_config_saved_before_the_scaling_loads_raw(tmp_path):
    """adapter_config.json files without `subspace_alpha` stored s itself in masm_s: they load as None."""
    MASMConfig(num_subspaces=2, subspace_rank=2).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["subspace_alpha"] == 100.0
    saved.pop("subspace_alpha")
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert MASMConfig.from_pretrained(tmp_path).subspace_alpha is None


def _one_sgd_step_move(alpha: float, lr: float = 1e-3) -> list[torch.Tensor]:
    """How far one plain-SGD step on ``masm_s`` moves each layer's singular values (from the same start), as
    ``alpha * rho * (change of masm_s)``: exact, where ``s0 + ...`` would round a small move away."""
    config = MASMConfig(num_subspaces=2, subspace_rank=2, subspace_alpha=alpha, fit_constraint="none")
    model = get_peft_model(tiny_vit(), config)
    layers = [m for m in model.modules() if isinstance(m, MASMLayer)]
    before = [layer.masm_s["default"][0].detach().clone() for layer in layers]
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "masm_s." in n], lr=lr)
    torch.manual_seed(0)
    model(pixel_values=torch.randn(2, 3, 32, 32)).logits.square().sum().backward()
    optimizer.step()
    return [
        layer.singular_value_unit("default") * (layer.masm_s["default"][0].detach() - b)
        for layer, b in zip(layers, before)
    ]


def test_a_plain_sgd_step_on_s_grows_with_alpha_squared():
    """Why PEFT's generic SGD tests need a lower lr for MASM (issue 26, item 15): SGD moves s by
    lr * (alpha * rho)**2 * dL/ds, the square of Adam's alpha * rho * lr, so alpha=100 is 1e4 x alpha=1's step."""
    small, large = _one_sgd_step_move(1.0), _one_sgd_step_move(100.0)
    for a, b in zip(small, large):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(b, a * 1e4, rtol=1e-3, atol=0.0)
