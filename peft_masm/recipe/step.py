"""The recipes' training step, built from a config: class-balanced cross-entropy, the optimizer and learning-rate
schedule, ``accelerator.prepare`` and one :class:`~peft_masm.training.TrainingStep` (``recipes/train.py`` and
``recipes/compare.py`` both train through it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import get_scheduler

from ..detector import forward_logits, head_parameter_ids
from ..training import TrainingStep, maybe_masm_model
from .config import TrainConfig
from .data import RecipeData
from .sampling import epoch_size, training_loader

__all__ = ["classification_loss", "optimizer_steps", "parameter_groups", "prepare_training"]

_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def optimizer_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps of a run on a training set of ``n_train`` items, all processes together (what the
    scheduler counts)."""
    batches = math.ceil(epoch_size(cfg, n_train) / cfg.batch_size)
    return math.ceil(batches / cfg.gradient_accumulation_steps) * cfg.epochs


def parameter_groups(cfg: TrainConfig, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: every trainable parameter at ``learning_rate``, except the classification
    head's at ``head_learning_rate`` when that is set and the backbone trains too."""
    trained = [p for p in model.parameters() if p.requires_grad]
    head_ids = head_parameter_ids(model) if cfg.head_learning_rate is not None else set()
    body = [p for p in trained if id(p) not in head_ids]
    if not body or len(body) == len(trained):
        return [{"params": trained}]
    head = [p for p in trained if id(p) in head_ids]
    return [{"params": body}, {"params": head, "lr": cfg.head_learning_rate}]


def classification_loss(
    model: torch.nn.Module, batch: dict[str, Any], class_weights: torch.Tensor | None
) -> Any:
    """Cross-entropy of the detector's logits (MASM's regularisers act inside ``optimizer.step()``)."""
    device = next(model.parameters()).device
    logits = forward_logits(model, batch["pixel_values"].to(device)).float()
    return torch.nn.functional.cross_entropy(logits, batch["labels"].to(device), weight=class_weights)


def prepare_training(
    cfg: TrainConfig,
    accelerator: Any,
    model: Any,
    data: RecipeData,
    after_optimizer_step: Callable[[int], Any] | None = None,
) -> tuple[TrainingStep, Any]:
    """The training step (loss, optimizer, scheduler, the prepared model) and the prepared training loader.

    ``after_optimizer_step`` is called with the step count after each taken step (AdaMSS's allocator).
    """
    class_weights = None  # balanced batches need none
    if cfg.balance_classes and cfg.sampling == "shuffle":
        counts = torch.bincount(torch.tensor(data.train_labels), minlength=2).float()
        class_weights = (counts.sum() / (2 * counts)).to(accelerator.device)
    train_loader = training_loader(cfg, data.train, data.train_labels)
    optimizer_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_class(
        parameter_groups(cfg, model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(_SCHEDULES[cfg.lr_scheduler], optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=optimizer_steps(cfg, len(data.train)))  # fmt: skip
    prepared, optimizer, train_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, scheduler
    )
    step = TrainingStep(prepared, optimizer, partial(classification_loss, class_weights=class_weights),
                        accelerator=accelerator, scheduler=scheduler, max_grad_norm=cfg.max_grad_norm,
                        on_non_finite=cfg.on_non_finite, masm_model=maybe_masm_model(model),
                        after_optimizer_step=after_optimizer_step)  # fmt: skip
    return step, train_loader
