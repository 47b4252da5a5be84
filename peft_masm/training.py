"""MASM in ``transformers.Trainer``: the layer-mask callback and a Trainer that adds the regularisers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .model import MASMModel


def find_masm_model(model: torch.nn.Module) -> MASMModel:
    """The ``MASMModel`` inside a PeftModel, possibly wrapped by DDP / accelerate / torch.compile."""
    for module in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if module is None:
            continue
        if isinstance(module, MASMModel):
            return module
        base = getattr(module, "base_model", None)
        if isinstance(base, MASMModel):
            return base
    raise ValueError(
        f"{type(model).__name__} holds no MASM adapter: build it with get_peft_model(model, MASMConfig(...)) "
        "after `import peft_masm`."
    )


class MASMTrainerCallback(TrainerCallback):
    """Runs ``update_layer_mask`` in ``on_pre_optimizer_step`` (after clipping, before ``optimizer.step()``)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        # state.global_step counts finished optimizer steps; the one about to happen is the next.
        find_masm_model(model).update_layer_mask(state.global_step + 1)


class MASMTrainer(Trainer):
    """A ``Trainer`` that adds MASM's regularisers to the task loss and runs the layer mask.

    PEFT's ``PeftModel.forward`` drops a tuner's own loss for vision models, so the regularisers
    (``regularization_loss()["total"]``) are added here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, MASMTrainerCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(MASMTrainerCallback())

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        masm = find_masm_model(model)
        config = masm.peft_config[masm.active_adapters[0]]
        if config.orthogonality_weight or config.spectral_weight:
            loss = loss + masm.regularization_loss()["total"].to(loss.device)
        return (loss, outputs) if return_outputs else loss
