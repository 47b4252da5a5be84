"""The recipe's training step: task loss, backward, clipping, optimizer, scheduler; MASM acts inside the step.

``TrainingStep`` is what ``recipes/train.py`` and the benchmarks run for every batch. For a MASM adapter with
``step_hooks`` on (the default) it is a plain PEFT step: the non-finite guard, the regularisers' gradient, the
layer mask, the fit bound and the step count act inside ``optimizer.step()`` (``peft_masm.tuner.step_hooks``),
exactly as in any user's loop. With ``step_hooks=False`` it runs them itself, in the order they had before the
hooks existed: the regularisers added to each micro-batch's loss (so clipped with it), clipping, the non-finite
check, ``update_layer_mask()``, ``optimizer.step()``, ``apply_fit_bound()``. Any other adapter (a LoRA baseline)
trains through the same step with the non-finite guard and a step count of its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .tuner import MASMModel
from .tuner.step_hooks import NonFiniteLossError, StepState, add_regularizer_gradient, check_finite_gradients

__all__ = [
    "NonFiniteLossError",
    "StepOutput",
    "TrainingStep",
    "calibrate_layer_mask",
    "check_finite_gradients",
    "find_masm_model",
    "scheduled_regularization",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def find_masm_model(model: nn.Module) -> MASMModel:
    """The ``MASMModel`` inside a PeftModel, possibly wrapped by DDP / accelerate / torch.compile."""
    masm = maybe_masm_model(model)
    if masm is None:
        raise ValueError(
            f"{type(model).__name__} holds no MASM adapter: build it with get_peft_model(model, MASMConfig(...)) "
            "after `import peft_masm`."
        )
    return masm


def maybe_masm_model(model: nn.Module) -> MASMModel | None:
    """Like :func:`find_masm_model`, but ``None`` for a model with another adapter (e.g. a LoRA baseline)."""
    for module in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if module is None:
            continue
        if isinstance(module, MASMModel):
            return module
        base = getattr(module, "base_model", None)
        if isinstance(base, MASMModel):
            return base
    return None


def regularisers_enabled(masm: MASMModel) -> bool:
    """Whether the active adapter has a non-zero regulariser weight (else the loss skips them)."""
    config = masm.peft_config[masm.active_adapters[0]]
    return bool(config.orthogonality_weight or config.spectral_weight)


def scheduled_regularization(masm: MASMModel, completed_steps: int) -> dict[str, torch.Tensor] | None:
    """The regularisers to add to a micro-batch's loss, or ``None`` when they are off or not due.

    ``completed_steps`` counts the optimizer steps already taken. With ``regularization_interval = N`` the terms
    are computed for optimizer steps 0, N, 2N, ... (every micro-batch of such a step) and their ``total`` is
    weighted N times (lazy regularisation: the same average pull at 1/N of the cost); N = 1 is every step.
    """
    if not regularisers_enabled(masm):
        return None
    interval = masm.peft_config[masm.active_adapters[0]].regularization_interval
    if completed_steps % interval:
        return None
    terms = masm.regularization_loss()
    return terms if interval == 1 else {**terms, "total": terms["total"] * interval}


@dataclass
class StepOutput:
    """What one call of :class:`TrainingStep` did."""

    loss: float  # task loss + regularisers of this micro-batch
    task_loss: float
    regularization: dict[str, float] = field(default_factory=dict)
    optimizer_step: bool = False  # this micro-batch ended an optimizer step (accumulation boundary)
    skipped: bool = False  # that optimizer step was skipped (non-finite gradients, on_non_finite="skip")


class TrainingStep:
    """One micro-batch of training (see the module docstring for what runs where).

    ``loss_fn(model, batch)`` returns the task loss. With an ``accelerator`` the step uses its gradient
    accumulation, backward, clipping and synchronisation; without one it is a plain PyTorch step.
    ``after_optimizer_step(step)`` runs after each optimizer step that was taken, before the gradients are
    cleared (``step`` counts taken steps from 1). ``on_non_finite`` ("raise" or "skip") overrides a MASM
    adapter's config (``MASMConfig.on_non_finite``); any other adapter raises unless told to skip.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        accelerator: Any = None,
        scheduler: Any = None,
        max_grad_norm: float | None = None,
        on_non_finite: Literal["raise", "skip"] | None = None,
        masm_model: MASMModel | None = None,
        after_optimizer_step: Callable[[int], Any] | None = None,
    ) -> None:
        if on_non_finite not in ("raise", "skip", None):
            raise ValueError(f"on_non_finite must be 'raise' or 'skip', got {on_non_finite!r}.")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.accelerator = accelerator
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.on_non_finite = on_non_finite
        self.masm = masm_model if masm_model is not None else maybe_masm_model(model)
        if self.masm is not None and on_non_finite is not None:
            self.masm.step_state.on_non_finite = on_non_finite
        self.after_optimizer_step = after_optimizer_step
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        # The one count of taken optimizer steps: the MASM model's own, or (any other adapter) this step's.
        self.step_state = self.masm.step_state if self.masm is not None else StepState()

    @property
    def hooks(self) -> bool:
        """Whether MASM's step hooks do the MASM work of this step."""
        return self.masm is not None and self.masm.peft_config[self.masm.active_adapters[0]].step_hooks

    @property
    def optimizer_steps(self) -> int:
        """The number of taken optimizer steps (``step_state.num_steps``; for MASM the model's own count)."""
        return self.step_state.num_steps

    def loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, task, regularisation terms)`` for ``batch`` (terms only where the loss carries them)."""
        task = self.loss_fn(self.model, batch)
        if self.masm is None or self.hooks:
            return task, task, {}
        terms = scheduled_regularization(self.masm, self.optimizer_steps)
        if terms is None:
            return task, task, {}
        return task + terms["total"].to(task.device), task, terms

    def calibrate(self, loader: Iterable[Any], num_batches: int) -> torch.Tensor:
        """The static layer mask's calibration pass, with this step's loss (see :func:`calibrate_layer_mask`)."""
        return calibrate_layer_mask(self.model, loader, lambda model, batch: self.loss(batch)[0], num_batches)

    def _boundary(self) -> bool:
        return True if self.accelerator is None else bool(self.accelerator.sync_gradients)

    def _clip(self) -> torch.Tensor | None:
        limit = self.max_grad_norm
        if self.accelerator is not None:
            if self.accelerator.scaler is not None:  # fp16: the grad scaler skips overflowing steps itself
                return self.accelerator.clip_grad_norm_(self.params, limit) if limit is not None else None
            if limit is None and self.hooks:
                return None  # the step hook checks the gradients itself
            return self.accelerator.clip_grad_norm_(self.params, limit if limit is not None else math.inf)
        if limit is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, limit)
        return None

    def _before_step(self) -> bool:
        """At an accumulation boundary, after clipping: what the loop itself runs before ``optimizer.step()``
        (nothing MASM-specific with step hooks). False when a non-finite step is skipped."""
        norm = self._clip()
        if self.hooks:
            self.masm.step_state.skipped = False
            return True
        fp16 = self.accelerator is not None and self.accelerator.scaler is not None
        step = self.optimizer_steps + 1
        on_non_finite = self.on_non_finite or "raise"
        if self.masm is not None:
            config = self.masm.peft_config[self.masm.active_adapters[0]]
            on_non_finite = self.masm.step_state.on_non_finite or config.on_non_finite
        if not fp16 and not check_finite_gradients(self.params, step, on_non_finite, norm):
            return False
        if self.masm is not None:
            self.masm.update_layer_mask()  # with step_hooks=False it also advances the step count
        else:
            self.step_state.num_steps += 1
        return True

    def __call__(self, batch: Any) -> StepOutput:
        accumulate = (
            self.accelerator.accumulate(self.model)
            if self.accelerator is not None
            else contextlib.nullcontext()
        )
        with accumulate:
            total, task, terms = self.loss(batch)
            if self.accelerator is not None:
                self.accelerator.backward(total)
            else:
                total.backward()
            boundary = self._boundary()
            taken = self._before_step() if boundary else True
            if taken:
                self.optimizer.step()  # accelerate's prepared optimizer only steps at boundaries
                if boundary and self.hooks:
                    taken = not self.masm.step_state.skipped
                    terms = dict(self.masm.step_state.regularization)
                elif boundary and self.masm is not None:
                    self.masm.apply_fit_bound()
            if taken:
                if self.scheduler is not None:
                    self.scheduler.step()
                if boundary and self.after_optimizer_step is not None:
                    self.after_optimizer_step(self.optimizer_steps)
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(
            loss=float(total.detach()),
            task_loss=float(task.detach()),
            regularization={k: float(v.detach()) for k, v in terms.items()},
            optimizer_step=boundary,
            skipped=not taken,
        )


def calibrate_layer_mask(
    peft_model: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn, num_batches: int = 8
):
    """Static layer mask (``layer_mask="static"``): gradient statistics over ``num_batches`` batches, then one
    decision kept for the whole run. Call it once before training (``TrainingStep.calibrate`` and
    ``MASMTrainer`` do). ``loss_fn(model, batch)`` returns the scalar loss. Returns the keep mask over units.
    """
    masm = find_masm_model(peft_model)
    controller = masm.layer_mask
    hooks = masm.peft_config[masm.active_adapters[0]].step_hooks
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}.")
    seen = 0
    for batch in dataloader:
        if seen >= num_batches:
            break
        peft_model.zero_grad(set_to_none=True)
        loss_fn(peft_model, batch).backward()
        if hooks:  # the gradient an optimizer step would see: the regularisers' part added as its hook does
            add_regularizer_gradient(masm)
        controller.accumulate()
        seen += 1
    peft_model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("calibrate_layer_mask got an empty data loader: it needs at least one batch.")
    keep = controller.decide(0)
    controller.calibrated = True
    return keep
