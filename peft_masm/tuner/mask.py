"""The selective layer mask (docs/method.md): gradient statistics, decisions and their history.

A *unit* is a layer (``mask_granularity="layer"``) or one (layer, subspace) pair. For each unit the
controller keeps exponential moving averages of its gradients (mean and second moment, per element)
and scores its learning state by the gradient signal-to-noise ratio
``GSNR = ||m||^2 / sum(E[g^2] - m^2)``. At each decision the ``mask_keep_ratio`` best units train until
the next decision and the others are masked: their gradients are set to ``None`` before the update (inside
``optimizer.step()`` through the step hooks, or in ``update_layer_mask()`` with ``step_hooks=False``), so Adam
neither moves nor decays them. The decision can change its mind: the
statistics keep folding in the gradients of masked units (they are computed by ``backward()`` and read
before they are dropped), so a masked unit whose updates become consistent again is kept at a later
decision. How strongly a subspace may fit is not the mask's business (``fit_constraint`` bounds it
without freezing anything). Masks are the layers' persistent ``masm_mask`` buffers; ``requires_grad``
is never touched. ``layer_mask="static"`` takes one decision from a calibration pass and keeps it. The heatmap of
the decisions is drawn by ``peft_masm.visualization.plot_mask_history``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import MASMConfig
    from .layer import MASMLayer

logger = logging.getLogger(__name__)


@dataclass
class _Unit:
    name: str
    layer: MASMLayer
    subspaces: list[int]

    def params(self, adapter: str) -> list[torch.nn.Parameter]:
        """The trainable tensors of this unit: all of its layer's, or those of its one subspace."""
        factors = (self.layer.masm_U[adapter], self.layer.masm_s[adapter], self.layer.masm_V[adapter])
        if len(self.subspaces) == self.layer.masm_num_subspaces[adapter]:
            return [p for blocks in factors for p in blocks]
        return [blocks[j] for j in self.subspaces for blocks in factors]


class LayerMaskController:
    """Gradient statistics and mask decisions for one adapter of a ``MASMModel``.

    It is given the adapter's layers and config, never the model. The step hooks call its ``step`` inside
    ``optimizer.step()`` (with ``step_hooks=False``: ``MASMModel.update_layer_mask()``). It has ``state_dict()`` /
    ``load_state_dict()`` so ``accelerator.register_for_checkpointing(controller)`` saves the
    statistics with the training state (the step count is the model's ``step_state``).
    """

    def __init__(self, layers: list[tuple[str, MASMLayer]], config: MASMConfig, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self.config = config
        if not layers:
            raise ValueError(f"The model has no MASM layer with adapter '{adapter_name}'; nothing to mask.")
        self.units: list[_Unit] = []
        for name, layer in layers:
            num = layer.masm_num_subspaces[adapter_name]
            if self.config.mask_granularity == "layer":
                self.units.append(_Unit(name, layer, list(range(num))))
            else:
                if len(layer.masm_s[adapter_name]) != num:
                    raise ValueError(
                        f"mask_granularity='subspace' needs one factor tensor per subspace, but layer '{name}' was "
                        "built with one for all subspaces (the config said no subspace mask then): set layer_mask "
                        "and mask_granularity in the MASMConfig before get_peft_model."
                    )
                self.units.extend(_Unit(f"{name}[{j}]", layer, [j]) for j in range(num))
        self.ema_mean: list[list[torch.Tensor]] | None = None
        self.ema_sq: list[list[torch.Tensor]] | None = None
        self.num_updates = 0  # gradients folded into the statistics (training steps and calibration batches)
        self.calibrated = False
        self.history_steps: list[int] = []
        self.history_masks: list[list[float]] = []
        self._keep: list[bool] | None = None  # cache of the masm_mask buffers (no device sync per step)

    # ---------------------------------------------------------------------------------- statistics
    def _grads(self) -> list[list[torch.Tensor | None]]:
        return [[p.grad for p in unit.params(self.adapter_name)] for unit in self.units]

    @torch.no_grad()
    def accumulate(self) -> None:
        """Fold the current gradients into the moving averages (call once per optimizer step)."""
        grads = self._grads()
        if all(g is None for unit in grads for g in unit):
            raise RuntimeError(
                "update_layer_mask() found no gradient on any MASM parameter: call it after loss.backward() "
                "(accelerator.backward) and before optimizer.step() / optimizer.zero_grad()."
            )
        beta = self.config.mask_ema_decay
        if self.ema_mean is None:
            params = [unit.params(self.adapter_name) for unit in self.units]
            self.ema_mean = [[torch.zeros_like(p, dtype=torch.float32) for p in unit] for unit in params]
            self.ema_sq = [[torch.zeros_like(p, dtype=torch.float32) for p in unit] for unit in params]
        # All units in one set of fused ops (a loop over units costs three launches per unit on a GPU).
        triples = [
            (g.float(), m, s)
            for unit_grads, means, squares in zip(grads, self.ema_mean, self.ema_sq)
            for g, m, s in zip(unit_grads, means, squares)
            if g is not None
        ]
        g, m, s = (list(t) for t in zip(*triples))
        torch._foreach_lerp_(m, g, 1 - beta)
        torch._foreach_lerp_(s, torch._foreach_mul(g, g), 1 - beta)
        self.num_updates += 1

    def gsnr(self) -> torch.Tensor:
        """Bias-corrected gradient signal-to-noise ratio of each unit (higher: more consistent updates)."""
        if self.ema_mean is None or self.num_updates == 0:
            raise RuntimeError("No gradient statistics yet: run at least one training step first.")
        correction = 1 - self.config.mask_ema_decay**self.num_updates
        scores = []
        for means, squares in zip(self.ema_mean, self.ema_sq):
            signal = sum(float((m / correction).square().sum()) for m in means)
            noise = sum(
                float((s / correction - (m / correction).square()).clamp_min(0).sum())
                for m, s in zip(means, squares)
            )
            scores.append(signal / max(noise, 1e-30))
        return torch.tensor(scores, dtype=torch.float64)

    # ------------------------------------------------------------------------------------ decisions
    @torch.no_grad()
    def decide(self, global_step: int) -> torch.Tensor:
        """Keep the ``mask_keep_ratio`` units of highest GSNR, mask the rest; returns the keep mask (1 = trains)."""
        scores = self.gsnr()
        num_keep = max(1, math.ceil(self.config.mask_keep_ratio * len(self.units)))
        # Stable descending order: ties go to the earlier unit, so decisions are deterministic.
        order = sorted(range(len(self.units)), key=lambda i: (-scores[i].item(), i))
        keep = torch.zeros(len(self.units))
        keep[order[:num_keep]] = 1.0
        previous = self._keep
        self._write_masks(keep)
        self.history_steps.append(int(global_step))
        self.history_masks.append(keep.tolist())
        current = self.current_keep()
        returned = 0 if previous is None else sum(int(now and not was) for was, now in zip(previous, current))
        logger.info(
            "MASM layer mask at step %d: %d of %d units train (%d back from masked)",
            global_step,
            num_keep,
            len(self.units),
            returned,
        )
        return keep

    def decision_summary(self) -> list[dict[str, int]]:
        """Per decision: its step, how many units train, and how many came back from being masked."""
        out, previous = [], None
        for step, row in zip(self.history_steps, self.history_masks):
            kept = [v > 0.5 for v in row]
            back = 0 if previous is None else sum(1 for was, now in zip(previous, kept) if now and not was)
            out.append({"step": int(step), "trained_units": sum(kept), "units": len(kept), "came_back": back})
            previous = kept
        return out

    def _write_masks(self, keep: torch.Tensor) -> None:
        for unit, value in zip(self.units, keep.tolist()):
            mask = unit.layer.masm_mask[self.adapter_name]
            mask[unit.subspaces] = value
        self._keep = [bool(v) for v in keep.tolist()]

    def current_keep(self) -> list[bool]:
        """Whether each unit trains now, read from the layers' ``masm_mask`` buffers."""
        return [bool(unit.layer.masm_mask[self.adapter_name][unit.subspaces].all()) for unit in self.units]

    def drop_masked_gradients(self) -> int:
        """Set the gradients of masked units to ``None``; returns how many units were masked."""
        if self._keep is None:  # first step: read the buffers once (they may come from a saved adapter)
            self._keep = self.current_keep()
        masked = 0
        for unit, keep in zip(self.units, self._keep):
            if keep:
                continue
            masked += 1
            for p in unit.params(self.adapter_name):
                p.grad = None
        return masked

    def step(self, step: int) -> None:
        """Optimizer step ``step`` (1 for the first; the model's ``step_state`` counts them): update statistics,
        decide when due, drop masked gradients. A decision is taken at step ``mask_warmup`` and every
        ``mask_interval`` steps after it (the first at ``mask_interval`` when ``mask_warmup`` is 0).
        """
        mode = self.config.layer_mask
        if mode == "none":
            return
        if mode == "static":
            if not self.calibrated:
                raise RuntimeError(
                    "layer_mask='static' needs a calibration first: call "
                    "peft_masm.calibrate_layer_mask(peft_model, dataloader, loss_fn, num_batches) before training."
                )
            self.drop_masked_gradients()
            return
        self.accumulate()
        if self.decision_due(step):
            self.decide(step)
        self.drop_masked_gradients()

    def decision_due(self, step: int) -> bool:
        """Whether the dynamic mask decides at optimizer step ``step`` (1-based)."""
        warmup, interval = self.config.mask_warmup, self.config.mask_interval
        first = warmup if warmup > 0 else interval
        return step >= first and (step - first) % interval == 0

    # ------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Statistics and decision history, for ``accelerator.save_state``."""
        return {
            "unit_names": [unit.name for unit in self.units],
            "ema_mean": self.ema_mean,
            "ema_sq": self.ema_sq,
            "num_updates": self.num_updates,
            "calibrated": self.calibrated,
            "history_steps": list(self.history_steps),
            "history_masks": [list(row) for row in self.history_masks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (the unit layout must match)."""
        names = [unit.name for unit in self.units]
        if state["unit_names"] != names:
            raise ValueError(
                "This layer-mask state belongs to a model with other MASM layers or granularity."
            )
        device = self.units[0].layer.masm_U0[self.adapter_name].device

        def to_device(nested):
            return None if nested is None else [[t.to(device) for t in unit] for unit in nested]

        ema_mean, ema_sq = to_device(state["ema_mean"]), to_device(state["ema_sq"])
        if ema_mean is not None:
            expected = [[tuple(p.shape) for p in unit.params(self.adapter_name)] for unit in self.units]
            saved = [[tuple(t.shape) for t in unit] for unit in ema_mean]
            if saved != expected:
                raise ValueError(
                    "This layer-mask state holds gradient statistics for another layout of the factor tensors "
                    "(saved by an earlier peft_masm, which kept one tensor per subspace): resume from a checkpoint "
                    "saved by this version, or drop the layer-mask state to start its statistics anew."
                )
        self.ema_mean, self.ema_sq = ema_mean, ema_sq
        self.num_updates = int(state["num_updates"])
        self.calibrated = bool(state["calibrated"])
        self.history_steps = list(state["history_steps"])
        self.history_masks = [list(row) for row in state["history_masks"]]
        self._keep = None  # the masks themselves are model buffers, restored with the model
