"""The recipes' training step, built from a config: class-balanced cross-entropy, the optimizer and learning-rate
schedule, ``accelerator.prepare`` and one :class:`~peft_masm.training.TrainingStep` (``recipes/train.py`` and
``recipes/compare.py`` both train through it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..data import collate
from ..detector import forward_logits
from ..training import TrainingStep, maybe_masm_model
from .config import TrainConfig
from .data import RecipeData

__all__ = ["classification_loss", "optimizer_steps", "prepare_training"]

_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def optimizer_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps of a run over ``n_train`` samples, all processes together (what the scheduler counts)."""
    return math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.gradient_accumulation_steps) * cfg.epochs


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
    counts = torch.bincount(torch.tensor(data.train_labels), minlength=2).float()
    class_weights = (counts.sum() / (2 * counts)).to(accelerator.device) if cfg.balance_classes else None
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    optimizer_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
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
