"""TrainingStep's hook after the optimizer step (PEFT's AdaMSS/AdaLoRA allocators run there)."""

from __future__ import annotations

import pytest
import torch
from peft import AdamssConfig, LoraConfig, get_peft_model
from tiny_training import image_batch, tiny_vit_classifier

from peft_masm import TrainingStep


def _batch(seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    batch = image_batch(seed)
    if nan:
        batch["pixel_values"][0, 0, 0, 0] = float("nan")
    return batch


def _vit():
    return tiny_vit_classifier()


def test_hook_runs_after_each_taken_step_with_the_gradients_still_there():
    model = get_peft_model(_vit(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))
    seen: list[tuple[int, bool]] = []

    def hook(step: int) -> None:
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        seen.append((step, all(g is not None for g in grads)))

    step = TrainingStep(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        lambda m, b: m(**b).loss,
        on_non_finite="skip",
        after_optimizer_step=hook,
    )
    step(_batch(0))
    with pytest.warns(RuntimeWarning, match="skipped"):
        step(_batch(1, nan=True))  # a skipped step: no hook
    step(_batch(2))
    assert seen == [(1, True), (2, True)]  # steps count taken steps only (issue 27)


def test_peft_adamss_allocation_runs_through_the_hook():
    config = AdamssConfig(
        r=8,
        num_subspaces=4,
        subspace_rank=1,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["classifier"],
        use_asa=True,
        asa_target_subspaces=3,
        init_warmup=1,
        final_warmup=4,
        mask_interval=2,
    )
    model = get_peft_model(_vit(), config)
    calls: list[int] = []

    def allocate(step: int) -> None:
        calls.append(step)
        model.base_model.update_and_allocate(step)

    step = TrainingStep(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        lambda m, b: m(**b).loss,
        after_optimizer_step=allocate,
    )
    for i in range(4):
        step(_batch(i))
    assert calls == [1, 2, 3, 4]
    # The allocator saw gradients (it scores subspaces from them) and switched some subspaces off.
    factors = [p for n, p in model.named_parameters() if "adamss_A" in n]
    assert any(not p.requires_grad for p in factors) and any(p.requires_grad for p in factors)
