"""Forgery-sensitive layers, chosen before training by the bias-variance of their gradients (FMSD).

Over a few training batches, the gradient of the detector's loss with respect to each transformer layer's adapter
targets (their weights, concatenated) is taken on the pretrained model. A layer the task pulls on consistently has
a gradient that points the same way from batch to batch: its squared mean is large against its spread. The score of
layer ``l`` over batches ``b`` is ``||mean_b g_b||^2 / mean_b ||g_b - mean_b g_b||^2``; the highest-scoring share of
the layers is kept, and the adapter goes on those layers only (``layers_to_transform``). Sums are accumulated, so
memory is one copy of the targets' weights whatever the number of batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["layer_gradient_scores", "select_layers", "target_weights_by_layer"]

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _is_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's matching: a list entry matches a name's last components, a string is a full-name regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def target_weights_by_layer(model: nn.Module, targets: list[str] | str) -> dict[int, list[nn.Parameter]]:
    """The weights of the linear layers ``targets`` names, grouped by their transformer layer (the first number
    in the module's name)."""
    layers: dict[int, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _is_target(name, targets):
            index = _LAYER_INDEX.search(f".{name}.")
            if index is not None:
                layers.setdefault(int(index.group(1)), []).append(module.weight)
    if not layers:
        raise ValueError(
            f"no linear layer of the model matches the targets {targets!r} inside a numbered layer"
        )
    return dict(sorted(layers.items()))


def layer_gradient_scores(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    targets: list[str] | str,
) -> dict[int, float]:
    """Each layer's gradient signal-to-noise score over ``batches`` (at least two), the model left as it was."""
    weights = target_weights_by_layer(model, targets)
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for params in weights.values():
        for p in params:
            p.requires_grad_(True)
    flat = [(layer, p) for layer, params in weights.items() for p in params]
    sums = [torch.zeros_like(p, dtype=torch.float64) for _, p in flat]  # sum over batches of each gradient
    squares = dict.fromkeys(weights, 0.0)  # sum over batches of each layer's squared gradient norm
    count = 0
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), [p for _, p in flat])
            for total, (layer, _), grad in zip(sums, flat, grads, strict=True):
                total += grad.double()
                squares[layer] += float(grad.double().pow(2).sum())
            count += 1
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    if count < 2:
        raise ValueError("the gradient scores need at least two batches")
    bias = dict.fromkeys(weights, 0.0)  # each layer's squared norm of the mean gradient
    for total, (layer, _) in zip(sums, flat, strict=True):
        bias[layer] += float((total / count).pow(2).sum())
    scores = {}
    for layer, b in bias.items():
        variance = max(squares[layer] / count - b, 0.0)
        scores[layer] = b / variance if variance > 0 else math.inf
    return scores


def select_layers(scores: dict[int, float], keep: float) -> list[int]:
    """The ``keep`` share of layers (at least one) with the highest scores, in layer order (ties: lower index)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    count = max(1, round(keep * len(scores)))
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:count])
