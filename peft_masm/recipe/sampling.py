"""The order the recipes draw training items in: a shuffle of the training set each epoch, or balanced batches,
real and fake items in turn, each class drawn with replacement (``sampling: balanced``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import collate
from .config import TrainConfig

__all__ = ["BalancedSampler", "epoch_size", "training_loader"]


class BalancedSampler(Sampler[int]):
    """Real and fake items in turn, each drawn with replacement, so that every batch of even size is half real and
    half fake. The draws depend on ``seed`` and the epoch only (``set_epoch``, which accelerate's loaders call), so
    every process draws the same sequence and a resumed epoch draws what the interrupted one drew."""

    def __init__(self, labels: Sequence[int], num_samples: int, seed: int) -> None:
        labels_array = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels_array == label) for label in (0, 1)]
        if not all(len(rows) for rows in self.by_class):
            raise ValueError("balanced sampling needs real and fake training items")
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_class = (self.num_samples + 1) // 2
        draws = [rows[rng.integers(len(rows), size=per_class)] for rows in self.by_class]
        yield from np.stack(draws, axis=1).reshape(-1)[: self.num_samples].tolist()


def epoch_size(cfg: TrainConfig, n_train: int) -> int:
    """Training items one epoch takes, all processes together: ``samples_per_epoch`` when balanced batches set it,
    else the training set's size."""
    if cfg.sampling == "balanced" and cfg.samples_per_epoch is not None:
        return cfg.samples_per_epoch
    return n_train


def training_loader(cfg: TrainConfig, dataset: Sequence, labels: Sequence[int]) -> DataLoader:
    """The training loader ``cfg.sampling`` asks for (``labels``: each item's 0/1 label, for balanced batches)."""
    common = {"batch_size": cfg.batch_size, "collate_fn": collate, "num_workers": cfg.num_workers}
    if cfg.sampling == "balanced":
        sampler = BalancedSampler(labels, epoch_size(cfg, len(dataset)), cfg.seed)
        return DataLoader(dataset, sampler=sampler, **common)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, shuffle=True, generator=generator, **common)
