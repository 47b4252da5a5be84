"""Lazy regularisation (``regularization_interval = N``): every training path adds the regularisers at every N-th
optimizer step only, weighted N times, and the terms themselves are the exact ones when they are added. The
explicit paths (``step_hooks=False``: the terms in the loss) and the step hook (their gradient added inside
``optimizer.step()``) are both checked."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_training import RowsDataset, image_batch, quiet_cpu_arguments, tiny_vit_classifier

from peft_masm import MASMConfig, MASMTrainer, TrainingStep
from peft_masm.training import find_masm_model


def _model(interval: int, step_hooks: bool = False):
    base = tiny_vit_classifier()
    config = MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        modules_to_save=["classifier"],
        orthogonality_weight=0.5,
        spectral_weight=0.5,
        init_weights=False,  # a non-identity start: the terms are non-zero from the first step
        regularization_interval=interval,
        step_hooks=step_hooks,
    )
    return get_peft_model(base, config)


def _loss(model, batch):
    return model(**batch).loss


def _u_grads(model, backward) -> dict[str, torch.Tensor]:
    """The gradients of the ``masm_U`` factors after ``backward()`` from zero (cleared again afterwards)."""
    model.zero_grad(set_to_none=True)
    backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "masm_U" in n}
    model.zero_grad(set_to_none=True)
    return grads


def _exact_total(model) -> float:
    with torch.no_grad():
        return float(find_masm_model(model).regularization_loss()["total"])


def test_config_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="regularization_interval must be a positive integer, got 0"):
        MASMConfig(regularization_interval=0)


def test_training_step_adds_the_weighted_terms_at_every_nth_step_only():
    model = _model(interval=3)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), _loss)
    added = []
    for i in range(7):
        expected = _exact_total(model)  # the exact terms, before this step
        out = step(image_batch(i))
        added.append(round(out.loss - out.task_loss, 6))
        if i % 3 == 0:
            assert out.regularization and added[-1] == pytest.approx(3 * expected, rel=1e-5)
        else:
            assert out.regularization == {} and added[-1] == 0
    assert [i for i, value in enumerate(added) if value] == [0, 3, 6]


def test_every_step_is_the_default_and_unchanged():
    model = _model(interval=1)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), _loss)
    for i in range(3):
        expected = _exact_total(model)
        out = step(image_batch(i))
        assert out.loss - out.task_loss == pytest.approx(expected, rel=1e-5)


def _check_weighted_gradient(model, weight: int, batch) -> None:
    masm = find_masm_model(model)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _loss)
    grads = _u_grads(model, lambda: step.loss(batch)[0].backward())
    task = _u_grads(model, lambda: _loss(model, batch).backward())
    reg = _u_grads(model, lambda: masm.regularization_loss()["total"].backward())
    for name in grads:
        torch.testing.assert_close(grads[name], task[name] + weight * reg[name])


def test_the_gradient_of_a_due_step_carries_n_times_the_regularisers():
    batch = image_batch(0)
    _check_weighted_gradient(_model(interval=4), 4, batch)
    _check_weighted_gradient(_model(interval=1), 1, batch)


def test_masm_trainer_follows_the_same_schedule(tmp_path):
    model = _model(interval=2)
    masm = find_masm_model(model)
    seen: list[int] = []
    original = masm.regularization_loss

    def counted(*args, **kwargs):
        seen.append(trainer.state.global_step)
        return original(*args, **kwargs)

    masm.regularization_loss = counted
    args = quiet_cpu_arguments(tmp_path)
    trainer = MASMTrainer(
        model=model, args=args, train_dataset=RowsDataset([image_batch(k) for k in range(5)])
    )
    trainer.train()
    assert trainer.state.global_step == 5
    assert seen == [0, 2, 4]


def test_the_step_hook_adds_the_weighted_gradient_at_every_nth_step_only():
    """A plain loop (no term in the loss): at due steps the factors' gradient gains N times the regularisers'
    gradient, the terms are kept for logs, and TrainingStep reports them; at other steps nothing is added."""
    model = _model(interval=3, step_hooks=True)
    masm = find_masm_model(model)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), _loss)
    logged = []
    for i in range(7):
        expected = _exact_total(model)
        out = step(image_batch(i))
        assert out.loss == out.task_loss  # nothing in the loss
        logged.append(bool(out.regularization))
        if out.regularization:
            assert out.regularization["total"] == pytest.approx(3 * expected, rel=1e-5)
    assert [i for i, value in enumerate(logged) if value] == [0, 3, 6]
    assert masm.step_state.num_steps == 7


def test_the_step_hook_gradient_is_n_times_the_regularisers():
    from peft_masm.tuner.step_hooks import add_regularizer_gradient

    model = _model(interval=4, step_hooks=True)
    masm = find_masm_model(model)
    batch = image_batch(0)

    def task_then_hook() -> None:
        _loss(model, batch).backward()
        add_regularizer_gradient(masm)

    grads = _u_grads(model, task_then_hook)
    task = _u_grads(model, lambda: _loss(model, batch).backward())
    reg = _u_grads(model, lambda: masm.regularization_terms()["total"].backward())
    for name in grads:
        torch.testing.assert_close(grads[name], task[name] + 4 * reg[name])
