"""The one MASM training step: task loss + regularisers, backward, clipping, non-finite guard, layer mask, optimizer.

``TrainingStep`` is what ``recipes/train.py`` and the benchmarks run for every batch, and
``peft_masm.MASMTrainer`` runs the same lifecycle inside ``transformers.Trainer``. The order at each
optimizer step (an accumulation boundary) is fixed here, once:

1. ``backward()`` of ``task loss + regularization_loss()["total"]`` (every micro-batch; with
   ``regularization_interval = N`` > 1, of every N-th optimizer step only, weighted N times);
2. gradient clipping (when ``max_grad_norm`` is set), which also yields the gradient norm;
3. non-finite check of that norm (after data-parallel synchronisation, so every rank agrees):
   raise :class:`NonFiniteLossError` naming the step, or skip the step with a warning;
4. ``update_layer_mask()`` (statistics, decisions, masked gradients dropped);
5. ``optimizer.step()``, then ``apply_fit_bound()`` (subspaces that outgrew ``fit_bound * rho`` are
   projected back onto it), ``scheduler.step()``;
6. ``after_optimizer_step(step)`` when given (e.g. PEFT AdaMSS's or AdaLoRA's
   ``model.base_model.update_and_allocate``, which want the gradients after the step), then
   ``optimizer.zero_grad()``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .tuner import MASMModel

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


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients of a training step are NaN or infinite (nothing was written to the adapter)."""


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


@torch.no_grad()
def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, in float32: one fused ``_foreach_norm`` per device and dtype (a
    per-tensor loop costs two kernel launches per trainable tensor, hundreds per step on a GPU). Half-precision
    gradients are widened first, so that a large but finite norm cannot overflow to inf."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    if not groups:
        return torch.zeros(())
    partial = []
    for (_, dtype), group in groups.items():
        if dtype in (torch.float16, torch.bfloat16):
            group = [g.float() for g in group]
        partial.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group)).float()))
    device = partial[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in partial]))


def check_finite_gradients(
    parameters: Iterable[nn.Parameter],
    step: int,
    on_non_finite: Literal["raise", "skip"] = "raise",
    norm=None,
) -> bool:
    """True when every gradient is finite. Otherwise raise :class:`NonFiniteLossError` naming ``step``, or
    (``on_non_finite="skip"``) warn, drop every gradient (so the optimizer skips the step) and return False.

    ``norm`` is the total gradient norm when already known (from clipping).
    """
    params = [p for p in parameters if p.grad is not None]
    if norm is None:
        norm = _total_norm([p.grad for p in params if p.grad is not None])
    value = float(norm)
    if math.isfinite(value):
        return True
    message = (
        f"optimizer step {step}: the gradients are not finite (total norm {value}); a NaN/inf in the inputs, "
        "labels or loss reached the adapter. Nothing was written to the adapter."
    )
    if on_non_finite == "raise":
        raise NonFiniteLossError(
            message + " Check the data of this step, lower the learning rate, or pass on_non_finite='skip'."
        )
    warnings.warn(message + " The step is skipped (on_non_finite='skip').", RuntimeWarning, stacklevel=2)
    for p in params:
        p.grad = None
    return False


@dataclass
class StepOutput:
    """What one call of :class:`TrainingStep` did."""

    loss: float  # task loss + regularisers of this micro-batch
    task_loss: float
    regularization: dict[str, float] = field(default_factory=dict)
    optimizer_step: bool = False  # this micro-batch ended an optimizer step (accumulation boundary)
    skipped: bool = False  # that optimizer step was skipped (non-finite gradients, on_non_finite="skip")


class TrainingStep:
    """One micro-batch of training, in the order given in this module's docstring.

    ``loss_fn(model, batch)`` returns the task loss; the regularisers of a MASM adapter are added here
    (a LoRA or other PEFT adapter trains through the same step without them). With an ``accelerator``
    the step uses its gradient accumulation, backward, clipping and synchronisation; without one it is
    a plain PyTorch step (``gradient_accumulation_steps`` is then 1). ``after_optimizer_step(step)`` runs
    after each optimizer step that was taken, before the gradients are cleared (step counts from 1).
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
        on_non_finite: Literal["raise", "skip"] = "raise",
        masm_model: MASMModel | None = None,
        after_optimizer_step: Callable[[int], Any] | None = None,
    ) -> None:
        if on_non_finite not in ("raise", "skip"):
            raise ValueError(f"on_non_finite must be 'raise' or 'skip', got {on_non_finite!r}.")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.accelerator = accelerator
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.on_non_finite = on_non_finite
        self.masm = masm_model if masm_model is not None else maybe_masm_model(model)
        self.after_optimizer_step = after_optimizer_step
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.optimizer_steps = 0  # optimizer steps taken or skipped (accumulation boundaries)

    def loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, task, regularisation terms)`` for ``batch``."""
        task = self.loss_fn(self.model, batch)
        terms = None if self.masm is None else scheduled_regularization(self.masm, self.optimizer_steps)
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
            return self.accelerator.clip_grad_norm_(self.params, limit if limit is not None else math.inf)
        if limit is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, limit)
        return None

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
            skipped = False
            if boundary:
                self.optimizer_steps += 1
                norm = self._clip()
                fp16 = self.accelerator is not None and self.accelerator.scaler is not None
                finite = fp16 or check_finite_gradients(
                    self.params, self.optimizer_steps, self.on_non_finite, norm
                )
                skipped = not finite
                if finite and self.masm is not None:
                    self.masm.update_layer_mask()
            if not skipped:
                self.optimizer.step()  # accelerate's prepared optimizer only steps at boundaries
                if boundary and self.masm is not None:
                    self.masm.apply_fit_bound()
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
            skipped=skipped,
        )


def calibrate_layer_mask(
    peft_model: nn.Module, dataloader: Iterable[Any], loss_fn: LossFn, num_batches: int = 8
):
    """Static layer mask (``layer_mask="static"``): gradient statistics over ``num_batches`` batches, then one
    decision kept for the whole run. Call it once before training (``TrainingStep.calibrate`` and
    ``MASMTrainer`` do). ``loss_fn(model, batch)`` returns the scalar loss. Returns the keep mask over units.
    """
    controller = find_masm_model(peft_model).layer_mask
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}.")
    seen = 0
    for batch in dataloader:
        if seen >= num_batches:
            break
        peft_model.zero_grad(set_to_none=True)
        loss_fn(peft_model, batch).backward()
        controller.accumulate()
        seen += 1
    peft_model.zero_grad(set_to_none=True)
    if seen == 0:
        raise ValueError("calibrate_layer_mask got an empty data loader: it needs at least one batch.")
    keep = controller.decide(0)
    controller.calibrated = True
    return keep
