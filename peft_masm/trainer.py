"""MASM in ``transformers.Trainer``.

With ``step_hooks`` on (the default) the stock ``transformers.Trainer`` trains MASM as it is: every MASM
mechanism acts inside ``optimizer.step()`` (``peft_masm.tuner.step_hooks``). ``MASMTrainer`` is then only needed
for ``layer_mask="static"``, whose calibration pass it runs at the start of training (or call
``peft_masm.calibrate_layer_mask`` before ``train()``); for anything else it is deprecated.

With ``step_hooks=False``, ``MASMTrainer`` adds the regularisers to the loss and its callback runs the
non-finite check and ``update_layer_mask()`` in ``on_pre_optimizer_step`` (after the Trainer's gradient
clipping) and the fit-bound projection in ``on_optimizer_step``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback

from .training import (
    calibrate_layer_mask,
    check_finite_gradients,
    find_masm_model,
    scheduled_regularization,
)

__all__ = ["MASMTrainer", "MASMTrainerCallback"]


def _step_hooks(masm) -> bool:
    return bool(masm.peft_config[masm.active_adapters[0]].step_hooks)


class MASMTrainerCallback(TrainerCallback):
    """The layer-mask lifecycle for ``transformers.Trainer``.

    ``calibration_loss(model, batch)`` (given by ``MASMTrainer``) is used for ``layer_mask="static"``;
    ``on_non_finite`` (``"raise"`` or ``"skip"``: drop the step's gradients with a warning) overrides the
    adapter's ``MASMConfig.on_non_finite`` when given.
    """

    def __init__(
        self,
        calibration_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        calibration_batches: int = 8,
        on_non_finite: Literal["raise", "skip"] | None = None,
    ) -> None:
        self.calibration_loss = calibration_loss
        self.calibration_batches = calibration_batches
        self.on_non_finite = on_non_finite

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        masm = find_masm_model(model)
        if self.on_non_finite is not None:
            masm.step_state.on_non_finite = self.on_non_finite
        if masm.peft_config[masm.active_adapters[0]].layer_mask != "static" or masm.layer_mask.calibrated:
            return
        if self.calibration_loss is None or train_dataloader is None:
            raise RuntimeError(
                "layer_mask='static' needs a calibration pass: use peft_masm.MASMTrainer (it calibrates on the "
                "training data), or call peft_masm.calibrate_layer_mask(model, loader, loss_fn) before train()."
            )
        calibrate_layer_mask(model, train_dataloader, self.calibration_loss, self.calibration_batches)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        masm = find_masm_model(model)
        if _step_hooks(masm):
            return  # optimizer.step() runs the guard and the mask itself
        params = [p for p in model.parameters() if p.requires_grad]
        action = self.on_non_finite or masm.peft_config[masm.active_adapters[0]].on_non_finite
        if check_finite_gradients(params, masm.step_state.num_steps + 1, action):
            masm.update_layer_mask()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        masm = find_masm_model(model)
        if not _step_hooks(masm):
            masm.apply_fit_bound()


class MASMTrainer(Trainer):
    """A ``Trainer`` that adds MASM's regularisers to the task loss and runs the layer mask.

    PEFT's ``PeftModel.forward`` drops a tuner's own loss for vision models, so the regularisers
    (``regularization_loss()["total"]``) are added here. ``mask_calibration_batches`` sizes the static
    mask's calibration pass; ``on_non_finite`` is passed to :class:`MASMTrainerCallback`.
    """

    def __init__(
        self,
        *args: Any,
        mask_calibration_batches: int = 8,
        on_non_finite: Literal["raise", "skip"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        masm = find_masm_model(self.model)
        if _step_hooks(masm) and masm.peft_config[masm.active_adapters[0]].layer_mask != "static":
            warnings.warn(
                "MASMTrainer is deprecated for this adapter: with step_hooks=True the stock transformers.Trainer "
                "trains MASM as it is (guard, regularisers, layer mask and fit bound act inside optimizer.step()).",
                FutureWarning,
                stacklevel=2,
            )
        if not any(isinstance(cb, MASMTrainerCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(
                MASMTrainerCallback(
                    self._calibration_loss, mask_calibration_batches, on_non_finite=on_non_finite
                )
            )

    def _calibration_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.compute_loss(model, self._prepare_inputs(batch))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        masm = find_masm_model(model)
        terms = None if _step_hooks(masm) else scheduled_regularization(masm, masm.step_state.num_steps)
        if terms is not None:
            loss = loss + terms["total"].to(loss.device)
        return (loss, outputs) if return_outputs else loss
