"""The recipes' training order and optimizer groups: balanced batches (``sampling: balanced``,
``samples_per_epoch``) and the head's own learning rate (``head_learning_rate``), the cross-forgery benchmark's
protocol as recipe config fields."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from tiny_training import tiny_vit_classifier

from peft_masm.recipe.config import ConfigError, load_config
from peft_masm.recipe.sampling import BalancedSampler, epoch_size, training_loader
from peft_masm.recipe.step import optimizer_steps, parameter_groups

# one real item in ten, as the cross-forgery training set (one real face, nine forgery families)
LABELS = [0] + [1] * 9
LABELS = LABELS * 8


class Items(torch.utils.data.Dataset):
    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.full((1,), float(i)), "labels": torch.tensor(self.labels[i])}


def _cfg(*args: str):
    return load_config(None, ["--batch_size", "8", "--seed", "3", *args])


def test_balanced_sampler_alternates_real_and_fake_drawn_with_replacement():
    sampler = BalancedSampler(LABELS, num_samples=200, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 200
    assert [LABELS[i] for i in order] == [0, 1] * 100
    reals = {i for i in order if LABELS[i] == 0}
    assert reals == {i for i, label in enumerate(LABELS) if label == 0}  # 100 draws over 8 reals: all of them


def test_balanced_draws_depend_on_seed_and_epoch_only():
    first, again, other_seed = (BalancedSampler(LABELS, 64, seed) for seed in (0, 0, 1))
    assert list(first) == list(first) == list(again)
    assert list(first) != list(other_seed)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0


def test_balanced_sampling_needs_both_classes():
    with pytest.raises(ValueError, match="real and fake"):
        BalancedSampler([1, 1, 1], 4, seed=0)


def test_every_prepared_batch_is_half_real_and_a_resumed_epoch_draws_the_same_batches():
    cfg = _cfg("--sampling", "balanced", "--samples_per_epoch", "40")
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(training_loader(cfg, Items(LABELS), LABELS))
    loader.set_epoch(2)
    batches = [b["pixel_values"].flatten().tolist() for b in loader]
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    for batch in batches:
        assert sum(LABELS[int(i)] for i in batch) == 4
    loader.set_epoch(2)
    resumed = [b["pixel_values"].flatten().tolist() for b in accelerator.skip_first_batches(loader, 2)]
    assert resumed == batches[2:]


def test_an_epoch_is_samples_per_epoch_with_balanced_batches_and_the_training_set_when_shuffled():
    balanced = _cfg(
        "--sampling", "balanced", "--samples_per_epoch", "960", "--batch_size", "32", "--epochs", "1"
    )
    assert epoch_size(balanced, 3820) == 960
    assert optimizer_steps(balanced, 3820) == 30  # what the scheduler and the mask schedule count
    assert epoch_size(_cfg("--sampling", "balanced"), 3820) == 3820
    shuffled = _cfg()
    assert epoch_size(shuffled, 80) == 80 and len(training_loader(shuffled, Items(LABELS), LABELS)) == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--samples_per_epoch", "960"],
            "samples_per_epoch must be a positive integer with sampling: balanced",
        ),
        (
            ["--sampling", "balanced", "--samples_per_epoch", "0"],
            "samples_per_epoch must be a positive integer",
        ),
        (["--head_learning_rate", "0"], "head_learning_rate must be > 0"),
        (["--sampling", "stratified"], "sampling"),
    ],
)
def test_bad_sampling_and_head_rate_values_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(*args)
    assert "\n" not in str(err.value)


def test_the_head_trains_at_head_learning_rate_while_the_backbone_trains_at_learning_rate():
    model = tiny_vit_classifier()
    head = {id(p) for p in model.classifier.parameters()}
    groups = parameter_groups(_cfg("--head_learning_rate", "1e-3"), model)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3 and "lr" not in groups[0]
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    assert len(parameter_groups(_cfg(), model)) == 1  # unset: one rate for all


def test_a_run_training_only_the_head_trains_it_at_learning_rate():
    model = tiny_vit_classifier()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    (group,) = parameter_groups(_cfg("--head_learning_rate", "1e-3"), model)
    assert "lr" not in group and {id(p) for p in group["params"]} == {
        id(p) for p in model.classifier.parameters()
    }
