"""MASM's cross-layer maths: the layers of one adapter that share a weight shape, computed as one stack.

The regularisers and the fit bound act on every layer at every (due) optimizer step. Layer by layer they would
cost a few dozen small ops per layer, each paid in full by a host-bound step (a GPU's at small batch), so the
layers of one weight shape and device are stacked (``U`` (L, m, K*k), ``s`` (L, K*k), ...) and every op runs once
per stack. This module is the one path to these values: ``MASMModel`` (its regularisers, fit bound and subspace
movement, and through them the step hooks), the tests and the benchmarks all call it. The formulas themselves are
the pure functions of ``regularizers.py``; what is read of a layer is its public API (``trainable_tensors``,
``frozen_tensor``, its config dicts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import regularizers

if TYPE_CHECKING:
    from .layer import MASMLayer

__all__ = [
    "Stack",
    "mean_regularization_terms",
    "project_fit_bound",
    "regularization_terms",
    "same_shape_groups",
    "stack_factors",
    "subspace_movement",
    "subspace_norms",
]


def same_shape_groups(layers: Sequence[MASMLayer], adapter_name: str) -> list[list[MASMLayer]]:
    """``layers`` grouped by weight shape and device, in order of first appearance: each group is one stack (a
    ViT's attention projections are one group; adding the MLP adds two)."""
    groups: dict[tuple, list[MASMLayer]] = {}
    for layer in layers:
        key = (layer.out_features, layer.in_features, layer.frozen_tensor("masm_U0", adapter_name).device)
        groups.setdefault(key, []).append(layer)
    return list(groups.values())


class Stack(NamedTuple):
    """The factors of L same-shape layers, stacked: U (L, m, T), s (L, T) in singular-value units, V (L, n, T),
    the raw trainable ``masm_s`` (L, T), s0 (L, T), each layer's reference scale rho (L,) and its singular-value
    unit ``subspace_alpha * rho`` (L, 1), or ``None`` for the raw parametrisation."""

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor
    raw_s: torch.Tensor
    s0: torch.Tensor
    rho: torch.Tensor
    units: torch.Tensor | None


def stack_factors(layers: Sequence[MASMLayer], adapter_name: str) -> Stack:
    """The factors of ``layers`` (one weight shape and device, factors set) as one ``Stack``."""
    first = layers[0]
    for layer in layers:
        layer.require_factors(adapter_name)
    m, n = first.out_features, first.in_features
    total = first.masm_num_subspaces[adapter_name] * first.masm_subspace_rank[adapter_name]
    count = len(layers)

    def side_by_side(factor: str) -> torch.Tensor:
        tensors = [t for layer in layers for t in layer.trainable_tensors(factor, adapter_name)]
        return torch.cat(tensors, dim=0 if factor == "masm_s" else 1)

    U = side_by_side("masm_U").reshape(m, count, total).transpose(0, 1)
    V = side_by_side("masm_V").reshape(n, count, total).transpose(0, 1)
    raw_s = side_by_side("masm_s").reshape(count, total)
    s0 = torch.stack([layer.frozen_tensor("masm_s0", adapter_name) for layer in layers])
    rho = torch.cat([layer.frozen_tensor("masm_rho", adapter_name) for layer in layers])
    alpha = first.masm_subspace_alpha[adapter_name]
    if alpha is None:
        return Stack(U, raw_s, V, raw_s, s0, rho, None)
    units = (rho * alpha)[:, None]
    return Stack(U, s0 + units * raw_s, V, raw_s, s0, rho, units)


def _frozen_stack(layers: Sequence[MASMLayer], buffer: str, adapter_name: str) -> torch.Tensor:
    return torch.stack([layer.frozen_tensor(buffer, adapter_name) for layer in layers])


# ------------------------------------------------------------------------------------ regularisers
@regularizers.full_precision
def regularization_terms(layers: Sequence[MASMLayer], adapter_name: str) -> dict[str, torch.Tensor]:
    """Each layer's ``orthogonality`` and ``spectral`` term ((L,) each, see ``regularizers.stacked_terms``) of
    layers that share a weight shape and device."""
    first = layers[0]
    stack = stack_factors(layers, adapter_name)
    weights = [layer.get_base_layer().weight.to(torch.float32) for layer in layers]
    # W^T U and W V as (U^T W)^T and (V^T W^T)^T: with the K*k columns as rows, each product streams the
    # row-major weight in its fast order (about 2x faster on CPU than W^T @ U, forward and backward).
    # (unbind, not indexing: its backward is one stack, not a zero-filled copy of the whole stack per layer)
    w_t_u = torch.stack([u.T @ weight for u, weight in zip(stack.U.unbind(0), weights)]).transpose(-1, -2)
    w_v = torch.stack([v.T @ weight.T for v, weight in zip(stack.V.unbind(0), weights)]).transpose(-1, -2)
    rank = min(first.out_features, first.in_features)
    penalty = first.masm_fit_constraint[adapter_name] == "penalty"
    return regularizers.stacked_terms(
        w_t_u,
        w_v,
        stack.U,
        stack.s,
        stack.V,
        _frozen_stack(layers, "masm_U0", adapter_name),
        stack.s0,
        _frozen_stack(layers, "masm_V0", adapter_name),
        stack.rho.square() * rank,
        rank,
        first.masm_subspace_rank[adapter_name],
        first.masm_fit_bound[adapter_name] if penalty else None,
    )


def mean_regularization_terms(layers: Sequence[MASMLayer], adapter_name: str) -> dict[str, torch.Tensor]:
    """``orthogonality`` and ``spectral`` averaged over ``layers`` (any shapes: one stack per shape and device)."""
    sums: dict[str, torch.Tensor] = {}
    for group in same_shape_groups(layers, adapter_name):
        for key, values in regularization_terms(group, adapter_name).items():
            sums[key] = sums[key] + values.sum() if key in sums else values.sum()
    return {key: value / len(layers) for key, value in sums.items()}


# -------------------------------------------------------------------------------------- fit bound
@torch.no_grad()
def project_fit_bound(layers: Sequence[MASMLayer], adapter_name: str) -> torch.Tensor:
    """Project every subspace of ``layers`` (any shapes; those still awaiting their factors are skipped) that
    outgrew ``fit_bound * rho`` back onto the bound, one stack per shape and device; returns how many were limited
    (a 0-d tensor on the layers' device: no sync). The caller checks that ``fit_constraint`` is ``"projection"``."""
    ready = [layer for layer in layers if not layer.pending_decomposition(adapter_name)]
    counts = [_project_stack(group, adapter_name) for group in same_shape_groups(ready, adapter_name)]
    if not counts:
        return torch.zeros((), dtype=torch.long)
    return torch.stack([count.to(counts[0].device) for count in counts]).sum()


@regularizers.full_precision
@torch.no_grad()
def _project_stack(layers: Sequence[MASMLayer], adapter_name: str) -> torch.Tensor:
    """The fit-bound projection of same-shape layers in a handful of batched ops: a limited subspace has its
    ``s_j`` scaled down, directions kept, and trains on as before (nothing is frozen). With
    ``train_factors="vectors"`` (``masm_s`` frozen) ``U_j`` and ``V_j`` are scaled instead, by the square root
    each: a frozen factor is never written. Untouched subspaces keep their exact values."""
    first = layers[0]
    rank = first.masm_subspace_rank[adapter_name]
    stack = stack_factors(layers, adapter_name)
    limits = first.masm_fit_bound[adapter_name] * stack.rho[:, None]
    scales = regularizers.fit_bound_scales(stack.U, stack.s, stack.V, rank, limits)  # (L, K)
    per_column = scales.repeat_interleave(rank, dim=-1)
    width = first.block_width(adapter_name)
    if "masm_s" in first.frozen_peft_weight_names.get(adapter_name, ()):
        root, limited = per_column.sqrt().unsqueeze(-2), (per_column < 1).unsqueeze(-2)  # (L, 1, T)
        for factor, values in (("masm_U", stack.U), ("masm_V", stack.V)):
            kept = torch.where(limited, values * root, values)
            _write(
                layers, factor, adapter_name, [block for f in kept.unbind(0) for block in f.split(width, -1)]
            )
        return (scales < 1).sum()
    if stack.units is None:
        scaled = stack.raw_s * per_column
    else:  # scale s_j = s0_j + unit * t_j, and write the offset t_j back
        scaled = (stack.s * per_column - stack.s0) / stack.units
    new = torch.where(per_column < 1, scaled, stack.raw_s)
    _write(
        layers,
        "masm_s",
        adapter_name,
        list(new.unbind(0) if width == new.shape[-1] else new.reshape(-1).split(width)),
    )
    return (scales < 1).sum()


def _write(layers: Sequence[MASMLayer], factor: str, adapter_name: str, values: list[torch.Tensor]) -> None:
    """Copy ``values`` into the tensors of ``factor`` of every layer, in order, in one fused op."""
    tensors = [t for layer in layers for t in layer.trainable_tensors(factor, adapter_name)]
    torch._foreach_copy_(tensors, values)


# -------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def subspace_norms(layers: Sequence[MASMLayer], adapter_name: str) -> torch.Tensor:
    """Spectral norm of each subspace ``U_j diag(s_j) V_j^T`` of same-shape layers, in units of their rho (L, K):
    what the fit bound holds below ``fit_bound``."""
    stack = stack_factors(layers, adapter_name)
    rank = layers[0].masm_subspace_rank[adapter_name]
    norms = regularizers.subspace_spectral_norms(stack.U, stack.s, stack.V, rank)
    return norms / stack.rho.clamp_min(1e-12)[:, None]


@regularizers.full_precision
@torch.no_grad()
def subspace_movement(layers: Sequence[MASMLayer], adapter_name: str) -> list[torch.Tensor]:
    """How far each subspace of each layer (any shapes) moved from its start, in units of the layer's rho:
    ``||U_j diag(s_j) V_j^T - U_j0 diag(s_j0) V_j0^T||_F / rho``, one (K,) tensor per layer, in order."""
    moved: dict[int, torch.Tensor] = {}
    for group in same_shape_groups(layers, adapter_name):
        moved.update(zip(map(id, group), _stack_movement(group, adapter_name).unbind(0)))
    return [moved[id(layer)] for layer in layers]


def _stack_movement(layers: Sequence[MASMLayer], adapter_name: str) -> torch.Tensor:
    """``subspace_movement`` of same-shape layers (L, K)."""
    stack = stack_factors(layers, adapter_name)
    U0, V0 = _frozen_stack(layers, "masm_U0", adapter_name), _frozen_stack(layers, "masm_V0", adapter_name)
    rank = layers[0].masm_subspace_rank[adapter_name]

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (L, rows, K*k) -> (L, K, rows, k)
        return x.reshape(*x.shape[:-1], -1, rank).movedim(-2, 1)

    # ||B A^T||_F^2 = sum((B^T B) * (A^T A)) per subspace, B = [U_j s_j, -U0_j s0_j], A = [V_j, V0_j]: no m x n
    B = torch.cat([blocks(stack.U * stack.s[:, None]), blocks(-U0 * stack.s0[:, None])], dim=-1)
    A = torch.cat([blocks(stack.V), blocks(V0)], dim=-1)
    energy = ((B.mT @ B) * (A.mT @ A)).sum(dim=(-2, -1))
    return energy.clamp_min(0).sqrt() / stack.rho.clamp_min(1e-12)[:, None]
