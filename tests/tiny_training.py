"""A tiny ViT classifier, its batches and a quiet CPU ``TrainingArguments``: shared by the training-loop tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=32,
    patch_size=8,
)


def tiny_vit_classifier(seed: int = 0) -> ViTForImageClassification:
    """A randomly initialised 2-class ViT built from a config (same seed, same weights)."""
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**SIZES, num_labels=2))


def image_batch(seed: int) -> dict[str, torch.Tensor]:
    """Four random 32 px images with labels 0, 1, 0, 1."""
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixels, "labels": torch.tensor([0, 1, 0, 1])}


class RowsDataset(torch.utils.data.Dataset):
    """The samples of some batches, one row each, for ``transformers.Trainer``."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.rows = [
            {key: value[i] for key, value in b.items()} for b in batches for i in range(len(b["labels"]))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def quiet_cpu_arguments(output_dir: Path) -> TrainingArguments:
    """One epoch at batch 4 on the CPU, no saving, no logging, no progress bar."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
