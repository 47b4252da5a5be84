"""Issue 10: one NaN pixel must not turn every MASM factor into NaN without a word.

Both training paths (``TrainingStep``, used by the recipe and the benchmarks, and ``MASMTrainer``)
stop at the optimizer step where the NaN appears, naming it, or skip that step with a warning; the
adapter's factors stay finite either way.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_training import RowsDataset, quiet_cpu_arguments, tiny_vit_classifier

from peft_masm import MASMConfig, MASMTrainer, NonFiniteLossError, TrainingStep


def _model():
    base = tiny_vit_classifier()
    return get_peft_model(
        base,
        MASMConfig(
            num_subspaces=2, subspace_rank=2, modules_to_save=["classifier"], orthogonality_weight=0.1
        ),
    )


def _batches(nan_at: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        pixels = torch.randn(4, 3, 32, 32, generator=generator)
        if i == nan_at:
            pixels[1, 0, 5, 7] = float("nan")  # one bad pixel
        batches.append({"pixel_values": pixels, "labels": torch.tensor([0, 1, 0, 1])})
    return batches


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "masm_" in n}


def _all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for n, p in model.named_parameters() if p.requires_grad)


def _loss(model, batch):
    return model(**batch).loss


def test_training_step_raises_at_the_step_with_the_nan():
    model = _model()
    step = TrainingStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), _loss)
    batches = _batches(nan_at=2)
    step(batches[0])
    step(batches[1])
    before = _factors(model)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3: the gradients are not finite"):
        step(batches[2])
    after = _factors(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing written
    assert _all_finite(model)


def test_training_step_can_skip_the_step_with_a_warning():
    model = _model()
    step = TrainingStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), _loss, on_non_finite="skip")
    batches = _batches(nan_at=1)
    step(batches[0])
    before = _factors(model)
    with pytest.warns(RuntimeWarning, match="optimizer step 2: .* The step is skipped"):
        out = step(batches[1])
    assert out.skipped and out.optimizer_step
    assert all(torch.equal(before[n], p) for n, p in _factors(model).items())
    out = step(batches[2])  # training goes on
    assert not out.skipped and _all_finite(model)
    assert any(not torch.equal(before[n], p) for n, p in _factors(model).items())


def test_training_step_with_max_grad_norm_still_stops_on_nan():
    model = _model()
    step = TrainingStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), _loss, max_grad_norm=1.0)
    with pytest.raises(NonFiniteLossError, match="optimizer step 1"):
        step(_batches(nan_at=0)[0])
    assert _all_finite(model)


def _trainer(tmp_path, on_non_finite):
    model = _model()
    args = quiet_cpu_arguments(tmp_path)
    trainer = MASMTrainer(
        model=model, args=args, train_dataset=RowsDataset(_batches(nan_at=1)), on_non_finite=on_non_finite
    )
    # No shuffling, so the bad batch is the second optimizer step.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return model, trainer


def test_masm_trainer_raises_at_the_step_with_the_nan(tmp_path):
    model, trainer = _trainer(tmp_path, "raise")
    with pytest.raises(NonFiniteLossError, match="optimizer step 2"):
        trainer.train()
    assert _all_finite(model)


def test_masm_trainer_can_skip_the_step(tmp_path):
    model, trainer = _trainer(tmp_path, "skip")
    with pytest.warns(RuntimeWarning, match="optimizer step 2: .* The step is skipped"):
        trainer.train()
    assert _all_finite(model)
    assert trainer.state.global_step == 4


def test_finiteness_check_sums_mixed_precision_gradients_without_overflow():
    from peft_masm.training import check_finite_gradients

    params = [
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.zeros(2, dtype=torch.float16)),
    ]
    params[0].grad = torch.tensor([3.0, 0.0, 4.0])
    params[1].grad = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    params[2].grad = torch.tensor([60000.0, 60000.0], dtype=torch.float16)  # norm 84853 > fp16 max
    assert check_finite_gradients(params, step=0)
    params[1].grad[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="optimizer step 0"):
        check_finite_gradients(params, step=0)
