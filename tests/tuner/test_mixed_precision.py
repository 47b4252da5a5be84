"""MASM under mixed precision: the regularisers, the fit bound and the diagnostics run in float32 whether or not
the caller's code sits inside ``torch.autocast`` (PyTorch's AMP recipe puts the forward and the loss there, so a
loop that adds ``regularization_loss()`` to its loss computes it under autocast), and they give the values they give
outside it. Found on the first GPU run of ``benchmarks/speed.py``: under bf16 autocast the subspace norms reached
``torch.linalg.qr`` / ``matrix_norm`` in bfloat16, which they refuse (the first four tests fail before the fix)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_training import image_batch

from peft_masm import MASMConfig
from peft_masm.tuner import stacked

from .conftest import tiny_vit


def _regularised_model(**overrides):
    config = MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        orthogonality_weight=0.1,
        spectral_weight=0.1,
        fit_constraint="penalty",
        **overrides,
    )
    model = get_peft_model(tiny_vit(), config)
    with torch.no_grad():  # move the factors off their start so that every term is non-zero
        for name, p in model.named_parameters():
            if p.requires_grad and "masm_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_regularisers_under_bfloat16_autocast_match_full_precision():
    model = _regularised_model()
    expected = model.base_model.regularization_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.base_model.regularization_loss()
    for key in ("orthogonality", "spectral", "total"):
        assert got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_training_step_under_bfloat16_autocast_backpropagates_the_regularisers():
    model = _regularised_model()
    model.train()
    batch = image_batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss = loss + model.base_model.regularization_loss()["total"]
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "masm_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("constraint", ["projection", "penalty"])
def test_fit_bound_and_diagnostics_under_bfloat16_autocast(constraint):
    model = _regularised_model()
    model.base_model.peft_config["default"].fit_constraint = constraint
    for _, layer in model.base_model.masm_layers("default"):
        layer.masm_fit_constraint["default"] = constraint
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "masm_s." in name:
                p.mul_(1e3)  # far past any bound: the projection has work to do
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if "masm_s." in n}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        limited = model.base_model.apply_fit_bound()
        norms = [
            stacked.subspace_norms([layer], "default")[0]
            for _, layer in model.base_model.masm_layers("default")
        ]
        movement = model.base_model.subspace_movement()
    assert all(n.dtype == torch.float32 and torch.isfinite(n).all() for n in norms)
    assert all(all(map(lambda v: v == v, values)) for values in movement.values())
    if constraint == "projection":
        assert int(limited) > 0
        changed = [
            n for n, p in model.named_parameters() if n in reference and not torch.equal(p, reference[n])
        ]
        assert changed
    else:
        assert int(limited) == 0


def test_masm_trainer_with_bf16_trains_the_regularised_adapter(tmp_path):
    """``transformers.Trainer`` mixed precision (``bf16=True``: accelerate's autocast around the forward) with both
    regularisers and the dynamic mask on trains and stays finite."""
    from dataclasses import replace

    from tiny_training import RowsDataset, quiet_cpu_arguments

    from peft_masm import MASMTrainer

    model = _regularised_model(layer_mask="dynamic", mask_warmup=1, mask_interval=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = replace(quiet_cpu_arguments(tmp_path), bf16=True)
    trainer = MASMTrainer(
        model=model, args=args, train_dataset=RowsDataset([image_batch(i) for i in range(3)])
    )
    trainer.train()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters())
