"""Forgery-sensitive layers chosen by the bias-variance of their gradients (``peft_masm.layer_selection``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peft_masm.layer_selection import layer_gradient_scores, select_layers, target_weights_by_layer


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4, bias=False)
        self.fc = nn.Linear(4, 4, bias=False)


class _Net(nn.Module):
    """Two layers; only layer 1's q_proj sees the label-carrying input, layer 0's sees noise."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.layers[0].q_proj(noise), self.layers[1].q_proj(x)], dim=-1))


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 2, (16,), generator=g)
        x = labels[:, None].float() * torch.ones(16, 4) + 0.1 * torch.randn(16, 4, generator=g)
        out.append({"x": x, "noise": torch.randn(16, 4, generator=g), "labels": labels})
    return out


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"], batch["noise"]), batch["labels"])


def test_targets_are_grouped_by_their_layer_number():
    net = _Net()
    layers = target_weights_by_layer(net, ["q_proj"])
    assert list(layers) == [0, 1] and layers[1] == [net.layers[1].q_proj.weight]
    assert [len(v) for v in target_weights_by_layer(net, r".*\.(q_proj|fc)").values()] == [2, 2]
    with pytest.raises(ValueError, match="no linear layer"):
        target_weights_by_layer(net, ["v_proj"])


def test_the_layer_with_a_consistent_gradient_scores_higher_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    net = _Net()
    net.head.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    scores = layer_gradient_scores(net, _batches(8), _loss, ["q_proj"])
    assert scores[1] > 3 * scores[0] and all(math.isfinite(v) and v >= 0 for v in scores.values())
    assert select_layers(scores, 0.5) == [1]
    assert not net.head.weight.requires_grad and net.layers[0].q_proj.weight.requires_grad
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="at least two batches"):
        layer_gradient_scores(net, _batches(1), _loss, ["q_proj"])


def test_select_layers_keeps_a_share_in_layer_order():
    scores = {0: 1.0, 1: 5.0, 2: 5.0, 3: 0.5}
    assert select_layers(scores, 0.5) == [1, 2] and select_layers(scores, 0.01) == [1]
    assert select_layers(scores, 1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep must be in"):
        select_layers(scores, 0.0)
