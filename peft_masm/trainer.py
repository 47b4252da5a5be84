"""MASM in ``transformers.Trainer``: the same lifecycle as :class:`peft_masm.training.TrainingStep`.

``MASMTrainer`` adds the regularisers to the loss and installs :class:`MASMTrainerCallback`, which runs
the static mask's calibration at the start of training and, at every optimizer step, the non-finite
check and ``update_layer_mask()`` in ``on_pre_optimizer_step`` (after the Trainer's gradient clipping,
before ``optimizer.step()``) and the fit-bound projection in ``on_optimizer_step`` (right after it),
exactly where ``TrainingStep`` runs them.
"""

from __future__ import annotations

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


class MASMTrainerCallback(TrainerCallback):
    """The layer-mask lifecycle for ``transformers.Trainer``.

    ``calibration_loss(model, batch)`` (given by ``MASMTrainer``) is used for ``layer_mask="static"``;
    ``on_non_finite`` is ``"raise"`` (default) or ``"skip"`` (drop the step's gradients with a warning).
    """

    def __init__(
        self,
        calibration_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        calibration_batches: int = 8,
        on_non_finite: Literal["raise", "skip"] = "raise",
    ) -> None:
        self.calibration_loss = calibration_loss
        self.calibration_batches = calibration_batches
        self.on_non_finite = on_non_finite

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        masm = find_masm_model(model)
        if masm.peft_config[masm.active_adapters[0]].layer_mask != "static" or masm.layer_mask.calibrated:
            return
        if self.calibration_loss is None or train_dataloader is None:
            raise RuntimeError(
                "layer_mask='static' needs a calibration pass: use peft_masm.MASMTrainer (it calibrates on the "
                "training data), or call peft_masm.calibrate_layer_mask(model, loader, loss_fn) before train()."
            )
        calibrate_layer_mask(model, train_dataloader, self.calibration_loss, self.calibration_batches)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if check_finite_gradients(params, state.global_step + 1, self.on_non_finite):
            find_masm_model(model).update_layer_mask()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        find_masm_model(model).apply_fit_bound()


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
        on_non_finite: Literal["raise", "skip"] = "raise",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
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
        terms = scheduled_regularization(find_masm_model(model), self.state.global_step)
        if terms is not None:
            loss = loss + terms["total"].to(loss.device)
        return (loss, outputs) if return_outputs else loss
