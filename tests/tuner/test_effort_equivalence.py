"""MASM with K=1, k=1 on the attention projections is Effort (Yan et al., ICML 2025).

Effort's published formulation replaces each weight by ``W_main + U_res diag(S_res) V_res`` with
``W_main`` the top ``r = d - 1`` SVD triplets and the residual triplet trainable. This test writes that
formula independently (its own full SVD, a dense weight) and compares outputs before and after the
residual moves.
"""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_masm import MASMConfig
from peft_masm.presets import masm_config
from peft_masm.tuner.layer import MASMLayer

from .conftest import output_of, tiny_clip


class EffortLinear(nn.Module):
    """Effort's layer, written from its paper: W = W_main + U_res diag(S_res) V_res (dense)."""

    def __init__(self, linear: nn.Linear, r_res: int = 1):
        super().__init__()
        U, S, Vh = torch.linalg.svd(linear.weight.data.double(), full_matrices=False)
        r = S.numel() - r_res
        self.weight_main = (U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).float()
        self.U_res = nn.Parameter(U[:, r:].float().clone())
        self.S_res = nn.Parameter(S[r:].float().clone())
        self.V_res = nn.Parameter(Vh[r:].float().clone())
        self.bias = linear.bias

    def forward(self, x):
        weight = self.weight_main + self.U_res @ torch.diag(self.S_res) @ self.V_res
        return nn.functional.linear(x, weight, self.bias)


def _effortify(model: nn.Module) -> None:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in {"q_proj", "k_proj", "v_proj", "out_proj"} and isinstance(child, nn.Linear):
                setattr(module, child_name, EffortLinear(child))


@pytest.mark.parametrize("subspace_alpha", [None, 100.0])
def test_effort_configuration_equals_effort(pixels, subspace_alpha):
    """The Effort preset (raw singular values) is Effort's formula; the scaled parametrisation of the same
    K=1, k=1 configuration is the same function of the effective singular values."""
    effort = tiny_clip()
    _effortify(effort)
    config = masm_config("effort", subspace_alpha=subspace_alpha)
    masm = get_peft_model(tiny_clip(), config)
    torch.testing.assert_close(output_of(masm, pixels), output_of(effort, pixels), atol=1e-5, rtol=1e-4)

    # Move the residual triplets the same way in both models (the SVD sign convention may differ: align it).
    torch.manual_seed(3)
    effort_layers = [m for m in effort.modules() if isinstance(m, EffortLinear)]
    masm_layers = [m for m in masm.modules() if isinstance(m, MASMLayer)]
    masm_by_name = {
        n.removeprefix("base_model.model."): m for n, m in masm.named_modules() if isinstance(m, MASMLayer)
    }
    effort_by_name = {n: m for n, m in effort.named_modules() if isinstance(m, EffortLinear)}
    assert len(effort_layers) == len(masm_layers) == 8
    with torch.no_grad():
        for name, e in effort_by_name.items():
            layer = masm_by_name[name]
            U = layer.masm_U["default"][0]
            sign = torch.sign((U[:, 0] * e.U_res[:, 0]).sum())
            du, dv, ds = torch.randn_like(U) * 0.2, torch.randn(layer.in_features, 1) * 0.2, 0.7
            layer.masm_U["default"][0].add_(du)
            layer.masm_V["default"][0].add_(dv)
            unit = layer.singular_value_unit("default") or 1.0  # masm_s is an offset in units of alpha * rho
            layer.masm_s["default"][0].add_(ds / unit)
            e.U_res.add_(sign * du)
            e.V_res.add_(sign * dv.T)
            e.S_res.add_(ds)
    torch.testing.assert_close(output_of(masm, pixels), output_of(effort, pixels), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(output_of(masm, pixels), output_of(tiny_clip(), pixels), atol=1e-3)


def test_effort_trainable_parameter_count():
    config = MASMConfig(num_subspaces=1, subspace_rank=1, layer_mask="none")
    model = get_peft_model(tiny_clip(), config)
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer: u (32) + s (1) + v (32); 8 attention projections
    assert trainable == 8 * (32 + 1 + 32)
