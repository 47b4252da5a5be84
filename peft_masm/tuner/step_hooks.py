"""MASM at every optimizer step, with no MASM call in the training loop.

A ``MASMModel`` registers itself here when it is built (``get_peft_model``, ``PeftModel.from_pretrained``), and
two global torch optimizer hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and
``..._post_hook``, installed once) act at every ``step()`` of any optimizer that holds the model's MASM factors.
``step()`` runs only for a *taken* step: accelerate calls it at accumulation boundaries only, and a
``GradScaler`` not at all when it skips an overflowing step. For the active adapter, in this order:

before the update (the loop's gradient clipping has already run):
  1. the non-finite guard over every gradient of the optimizer: raise :class:`NonFiniteLossError` naming the
     step, or (``on_non_finite="skip"``) drop every gradient, so that the optimizer writes nothing;
  2. the regularisers' gradient, when their weights are > 0 and the step is due (``regularization_interval``),
     added to the factors' gradients: it is not clipped, since clipping has already run;
  3. the layer mask: gradient statistics, a decision when due, masked gradients dropped;
after it:
  4. the fit-bound projection (``fit_constraint="projection"``), and the step count advances.

``MASMConfig(step_hooks=False)`` turns all of this off for a loop that calls the mechanisms itself.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Literal, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

__all__ = ["NonFiniteLossError", "StepState", "check_finite_gradients", "watch"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients of a training step are NaN or infinite (nothing was written to the adapter)."""


class StepState:
    """The number of taken optimizer steps of a MASM model (its one step count), and what the last step did.

    ``state_dict()`` / ``load_state_dict()`` let ``accelerator.register_for_checkpointing(state)`` save the
    count with the training state. ``regularization`` holds the regulariser terms of the last step that
    computed them (detached, for logs); ``skipped`` whether the last step was skipped as non-finite.
    """

    def __init__(self) -> None:
        self.num_steps = 0
        self.on_non_finite: Literal["raise", "skip"] | None = None  # set by a trainer: overrides the config's
        self.regularization: dict[str, torch.Tensor] = {}
        self.skipped = False
        self.explicit_mask_step = -1  # the step whose layer mask an explicit update_layer_mask() already ran
        self.explicit_regularization_step = -1  # the step whose loss the user gave regularization_loss()
        self.hook_projected: torch.Tensor | None = None  # the last step's fit-bound count, until read

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])


# ------------------------------------------------------------------------------------------- guard
@torch.no_grad()
def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, in float32, with one fused ``_foreach_norm`` per device and dtype.
    Half-precision gradients are widened first, so that a large but finite norm cannot overflow to inf."""
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
    parameters: Any,
    step: int,
    on_non_finite: Literal["raise", "skip"] = "raise",
    norm: torch.Tensor | None = None,
) -> bool:
    """True when every gradient is finite. Otherwise raise :class:`NonFiniteLossError` naming ``step``, or
    (``on_non_finite="skip"``) warn, drop every gradient (so the optimizer skips the step) and return False.

    ``norm`` is the total gradient norm when already known (from clipping).
    """
    params = [p for p in parameters if p.grad is not None]
    if norm is None:
        norm = total_norm([p.grad for p in params])
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
    warnings.warn(message + " The step is skipped (on_non_finite='skip').", RuntimeWarning, stacklevel=3)
    for p in params:
        p.grad = None
    return False


# ------------------------------------------------------------------------------------------- hooks
class MASMModel(Protocol):
    """What the hooks use of ``peft_masm.tuner.MASMModel`` (which imports this module, not the reverse)."""

    step_state: StepState
    peft_config: dict[str, Any]
    active_adapters: list[str]
    layer_mask: Any

    def acts_on(self, optimizer: torch.optim.Optimizer) -> bool: ...
    def trainable_factors(self, adapter_name: str | None = None) -> list[torch.Tensor]: ...
    def regularization_terms(self) -> dict[str, torch.Tensor]: ...
    def project_fit_bound(self) -> torch.Tensor: ...


_MODELS: weakref.WeakSet[MASMModel] = weakref.WeakSet()
_HANDLES: list[Any] = []


def watch(masm: MASMModel) -> None:
    """Let the optimizer hooks act for ``masm`` (installing them on first use)."""
    if not _HANDLES:
        _HANDLES.append(register_optimizer_step_pre_hook(_before_step))
        _HANDLES.append(register_optimizer_step_post_hook(_after_step))
    _MODELS.add(masm)


def _models_of(optimizer: torch.optim.Optimizer) -> list[MASMModel]:
    return [masm for masm in list(_MODELS) if masm.acts_on(optimizer)]


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for masm in _models_of(optimizer):
        before_update(masm, optimizer)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for masm in _models_of(optimizer):
        after_update(masm)


def before_update(masm: MASMModel, optimizer: torch.optim.Optimizer) -> None:
    """Steps 1-3 of the module docstring, for one optimizer step of ``masm``."""
    state = masm.step_state
    config = masm.peft_config[masm.active_adapters[0]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state.regularization = {}
    action = state.on_non_finite or config.on_non_finite
    state.skipped = not check_finite_gradients(params, state.num_steps + 1, action)
    if state.skipped:
        return
    add_regularizer_gradient(masm)
    if config.layer_mask != "none" and state.explicit_mask_step != state.num_steps + 1:
        masm.layer_mask.step(state.num_steps + 1)


def after_update(masm: MASMModel) -> None:
    """Step 4 of the module docstring: the fit bound, then the count (nothing after a skipped step)."""
    state = masm.step_state
    if state.skipped:
        return
    state.num_steps += 1
    state.hook_projected = masm.project_fit_bound()


@torch.no_grad()
def add_regularizer_gradient(masm: MASMModel) -> None:
    """Add the gradient of ``regularization_loss()["total"]`` (weighted ``regularization_interval`` times) to the
    factors' gradients, when the weights are > 0, the step is due and the loop did not add the terms itself."""
    state = masm.step_state
    config = masm.peft_config[masm.active_adapters[0]]
    due = state.num_steps % config.regularization_interval == 0
    if not (config.orthogonality_weight or config.spectral_weight) or not due:
        return
    if state.explicit_regularization_step == state.num_steps:
        return
    params = [p for p in masm.trainable_factors() if p.requires_grad]
    if not params:  # every factor frozen: nothing for the regularisers to move
        return
    with torch.enable_grad(), torch.autocast(params[0].device.type, enabled=False):
        terms = masm.regularization_terms()
        total = terms["total"] * config.regularization_interval
        grads = torch.autograd.grad(total, params, allow_unused=True)
    state.regularization = {**{k: v.detach() for k, v in terms.items()}, "total": total.detach()}
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad.to(param.dtype)
        else:
            param.grad.add_(grad.to(param.grad.dtype))
