"""Issue 27: MASM trained with a PEFT user's habits alone (no MASM call in the loop) is the method the explicit
path trains: the non-finite guard, the regularisers, the layer mask, the fit bound and the step count act inside
``optimizer.step()``. The reference is ``TrainingStep`` with ``step_hooks=False``: today's explicit path, where the
loop adds the regularisers to the loss and calls ``update_layer_mask()`` and ``apply_fit_bound()`` itself."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_training import RowsDataset, image_batch, quiet_cpu_arguments, tiny_vit_classifier

from peft_masm import MASMConfig, NonFiniteLossError, TrainingStep

STEPS = 6


def build(**overrides) -> PeftModel:
    """A tiny ViT with a MASM adapter whose mask decides at steps 2, 4, 6 and whose fit bound is small enough to
    limit subspaces within a few steps."""
    config = dict(
        layer_mask="dynamic", mask_warmup=2, mask_interval=2, fit_bound=0.05, modules_to_save=["classifier"]
    )
    config.update(overrides)
    return get_peft_model(tiny_vit_classifier(), MASMConfig(**config))


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def explicit_run(steps: int = STEPS, **overrides) -> PeftModel:
    model = build(step_hooks=False, **overrides)
    step = TrainingStep(model, adam(model), task_loss)
    for i in range(steps):
        step(image_batch(i))
    return model


def plain_run(steps: int = STEPS, **overrides) -> PeftModel:
    """LoRA's loop: backward, step, zero_grad, nothing else."""
    model = build(**overrides)
    optimizer = adam(model)
    for i in range(steps):
        task_loss(model, image_batch(i)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def masm_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Factors, masks and the head: everything the adapter saves."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "masm_" in k or "classifier" in k}


def nan_batch(seed: int) -> dict[str, torch.Tensor]:
    """``image_batch(seed)`` with one NaN pixel."""
    batch = image_batch(seed)
    batch["pixel_values"][0, 0, 0, 0] = float("nan")
    return batch


def assert_unchanged(before: dict[str, torch.Tensor], model: PeftModel) -> None:
    after = masm_state(model)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def assert_same_training(a: PeftModel, b: PeftModel) -> None:
    sa, sb = masm_state(a), masm_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.base_model.step_state.num_steps == b.base_model.step_state.num_steps
    assert a.base_model.layer_mask.history_masks == b.base_model.layer_mask.history_masks
    assert a.base_model.layer_mask.history_steps == b.base_model.layer_mask.history_steps


@pytest.mark.parametrize("regularised", [False, True], ids=["defaults", "regularised"])
def test_a_plain_loop_trains_what_the_explicit_path_trains(regularised):
    weights = dict(orthogonality_weight=0.1, spectral_weight=0.1) if regularised else {}
    plain, explicit = plain_run(**weights), explicit_run(**weights)
    assert_same_training(plain, explicit)  # bit for bit: no clipping, so the same sums in the same order
    assert plain.base_model.step_state.num_steps == STEPS
    assert plain.base_model.layer_mask.history_steps == [2, 4, 6]
    assert int(plain.base_model.apply_fit_bound()) > 0  # the last step's hook limited subspaces
    if regularised:
        assert set(plain.base_model.step_state.regularization) == {"orthogonality", "spectral", "total"}


def test_without_hooks_a_plain_loop_gets_none_of_it():
    """The switch: step_hooks=False leaves a plain loop to plain PEFT behaviour (the contrast that shows the
    hooks do the work): no mask decision, no count, subspaces left past their bound."""
    model = plain_run(step_hooks=False)
    assert model.base_model.step_state.num_steps == 0
    assert model.base_model.layer_mask.history_steps == []
    assert int(model.base_model.project_fit_bound()) > 0


def test_the_stock_trainer_trains_what_the_explicit_trainer_trained(tmp_path):
    """``transformers.Trainer`` with no subclass and no callback equals ``MASMTrainer`` with step_hooks=False
    (the Trainer's clipping at 1.0, AdamW and linear schedule on both sides)."""
    from transformers import Trainer

    from peft_masm import MASMTrainer

    data = RowsDataset([image_batch(i) for i in range(STEPS)])
    stock = build()
    Trainer(model=stock, args=quiet_cpu_arguments(tmp_path / "a"), train_dataset=data).train()
    explicit = build(step_hooks=False)
    MASMTrainer(model=explicit, args=quiet_cpu_arguments(tmp_path / "b"), train_dataset=data).train()
    assert_same_training(stock, explicit)
    assert stock.base_model.step_state.num_steps == STEPS


def test_accelerate_with_accumulation_acts_at_sync_steps_only():
    """A user's accelerate loop with gradient accumulation 2 and clipping: the hooks act at the 3 sync steps, as
    ``TrainingStep`` with step_hooks=False does."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def run(hooks: bool) -> PeftModel:
        # accelerate keeps its state per process; a Trainer run earlier in this process set accumulation to 1.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
        model = build(step_hooks=hooks)
        model, optimizer = accelerator.prepare(model, adam(model))
        if not hooks:
            step = TrainingStep(model, optimizer, task_loss, accelerator=accelerator, max_grad_norm=1.0)
        for i in range(STEPS):
            if not hooks:
                step(image_batch(i))
                continue
            with accelerator.accumulate(model):
                accelerator.backward(task_loss(model, image_batch(i)))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
        return accelerator.unwrap_model(model)

    plain, explicit = run(True), run(False)
    assert plain.base_model.step_state.num_steps == 3
    assert plain.base_model.layer_mask.history_steps == [2]
    assert_same_training(plain, explicit)


def test_a_grad_scaler_skipped_step_changes_nothing():
    """A ``GradScaler`` that finds an inf skips ``optimizer.step()``: no factor, mask statistic or count moves,
    so the run equals one that never saw that batch."""

    def run(skip_batch: int | None) -> PeftModel:
        model = build()
        optimizer = adam(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        for i in range(STEPS):
            scaler.scale(task_loss(model, image_batch(i))).backward()
            if i == skip_batch:
                next(p for p in model.parameters() if p.requires_grad).grad[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return model

    skipped = run(skip_batch=2)
    assert skipped.base_model.step_state.num_steps == STEPS - 1
    reference = build()
    optimizer = adam(reference)
    for i in [0, 1, 3, 4, 5]:
        task_loss(reference, image_batch(i)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_training(skipped, reference)


def test_a_nan_in_a_plain_loop_raises_naming_the_step_and_writes_nothing():
    model = build()
    optimizer = adam(model)
    task_loss(model, image_batch(0)).backward()
    optimizer.step()
    optimizer.zero_grad()
    before = masm_state(model)
    task_loss(model, nan_batch(1)).backward()
    with pytest.raises(NonFiniteLossError, match="optimizer step 2: the gradients are not finite"):
        optimizer.step()
    assert_unchanged(before, model)
    assert model.base_model.step_state.num_steps == 1


def test_a_nan_step_is_skipped_by_configuration():
    model = build(on_non_finite="skip")
    optimizer = adam(model)
    before = masm_state(model)
    task_loss(model, nan_batch(0)).backward()
    with pytest.warns(RuntimeWarning, match="optimizer step 1: .* The step is skipped"):
        optimizer.step()
    assert_unchanged(before, model)
    assert model.base_model.step_state.num_steps == 0
    assert model.base_model.layer_mask.num_updates == 0


def test_other_optimizers_leave_masm_untouched():
    """An optimizer holding no MASM factor (the head alone, or a second model) does not run MASM's hooks."""
    model = build(fit_bound=1e-6)
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    head_optimizer = torch.optim.SGD(head, lr=0.1)
    other = torch.nn.Linear(3, 1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    before = masm_state(model)
    task_loss(model, image_batch(0)).backward()
    other(torch.ones(3)).sum().backward()
    head_optimizer.step()
    other_optimizer.step()
    after = masm_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if "masm_" in k)
    assert model.base_model.step_state.num_steps == 0


def test_the_explicit_api_still_works_once(recwarn):
    """A loop written for the explicit API (regularisers in the loss, update_layer_mask, apply_fit_bound) with
    step_hooks on: each mechanism acts once, and each redundant call warns with its replacement."""
    weights = dict(orthogonality_weight=0.1, spectral_weight=0.1)
    model = build(**weights)
    optimizer = adam(model)
    for i in range(STEPS):
        loss = task_loss(model, image_batch(i)) + model.base_model.regularization_loss()["total"]
        loss.backward()
        model.base_model.update_layer_mask()
        optimizer.step()
        model.base_model.apply_fit_bound()
        optimizer.zero_grad()
    assert_same_training(model, explicit_run(**weights))
    messages = [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)]
    for name in ("regularization_loss", "update_layer_mask()", "apply_fit_bound()"):
        assert sum(name in m for m in messages) == 1, (name, messages)


def test_the_step_count_resumes_with_the_optimizer_and_training_state():
    """Resume in the middle of a plain loop: adapter, optimizer and ``step_state`` / ``layer_mask`` state saved
    after 3 steps and loaded into a fresh model give the uninterrupted run's result."""
    full = plain_run()
    model = build()
    optimizer = adam(model)
    for i in range(3):
        task_loss(model, image_batch(i)).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = (
        masm_state(model),
        optimizer.state_dict(),
        model.base_model.step_state.state_dict(),
        model.base_model.layer_mask.state_dict(),
    )
    resumed = build()
    resumed.load_state_dict(saved[0], strict=False)
    optimizer = adam(resumed)
    optimizer.load_state_dict(saved[1])
    resumed.base_model.step_state.load_state_dict(saved[2])
    resumed.base_model.layer_mask.load_state_dict(saved[3])
    for i in range(3, STEPS):
        task_loss(resumed, image_batch(i)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_training(resumed, full)


def test_a_loaded_trainable_adapter_trains_through_the_hooks(tmp_path):
    """``PeftModel.from_pretrained(..., is_trainable=True)`` gets the same hooks as ``get_peft_model``: training
    on from a saved adapter equals training on the original model (no layer mask here: its statistics and the
    step count belong to a run's training state, not to the adapter file)."""
    model = plain_run(steps=2, layer_mask="none")
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_vit_classifier(), tmp_path / "adapter", is_trainable=True)
    for trained in (model, loaded):
        optimizer = adam(trained)
        for i in range(2, 4):
            task_loss(trained, image_batch(i)).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert loaded.base_model.step_state.num_steps == 2  # a new training run counts its own steps
    assert int(loaded.base_model.apply_fit_bound()) > 0  # the hook projected after the last step
    original, reloaded = masm_state(model), masm_state(loaded)
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
