import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_training import tiny_vit_classifier

import peft_masm
from peft_masm import MASMConfig, calibrate_layer_mask, plot_mask_history
from peft_masm.tuner import stacked

SCRIPT = Path(__file__).with_name("train_script.py")


def tiny_model(**config_kwargs):
    base = tiny_vit_classifier()
    kwargs = dict(
        num_subspaces=2,
        subspace_rank=2,
        modules_to_save=["classifier"],
        mask_warmup=1,
        mask_interval=2,
        layer_mask="dynamic",
    )
    kwargs.update(config_kwargs)
    model = get_peft_model(base, MASMConfig(**kwargs))
    model.base_model.decompose()
    return model


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)
    ]


def train(model, steps, optimizer=None, seed=0):
    optimizer = optimizer or torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for x, y in batches(steps, seed):
        model(pixel_values=x, labels=y).loss.backward()
        model.base_model.update_layer_mask()
        optimizer.step()
        model.base_model.apply_fit_bound()
        optimizer.zero_grad()
    return optimizer


def masm_params(model):
    return {n: p for n, p in model.named_parameters() if "masm_" in n and p.requires_grad}


def test_masked_layers_do_not_move_and_keep_their_optimizer_state():
    model = tiny_model(mask_keep_ratio=0.5, mask_warmup=1, mask_interval=100)
    optimizer = train(model, 3)  # decision at step 1, then fixed
    controller = model.base_model.layer_mask
    keep = controller.current_keep()
    assert sum(keep) == len(keep) // 2
    before = {n: p.detach().clone() for n, p in masm_params(model).items()}
    opt_before = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in masm_params(model).items()
        if p in optimizer.state
    }
    # PEFT resets requires_grad in both of these; the mask must survive them
    with model.disable_adapter():
        pass
    model.set_adapter("default")
    train(model, 3, optimizer, seed=1)
    masked_names = {
        n
        for unit, k in zip(controller.units, keep)
        if not k
        for n in masm_params(model)
        if n.removeprefix("base_model.model.").startswith(unit.name + ".")
    }
    assert masked_names
    for name, param in masm_params(model).items():
        moved = not torch.equal(param, before[name])
        assert moved == (name not in masked_names), name
        if name in masked_names and name in opt_before:
            for key, value in optimizer.state[param].items():
                assert torch.equal(value, opt_before[name][key]), (name, key)
    assert controller.current_keep() == keep


def test_decisions_are_deterministic():
    histories = []
    for _ in range(2):
        model = tiny_model(mask_keep_ratio=0.5, mask_granularity="subspace")
        train(model, 6)
        histories.append(model.base_model.layer_mask.history_masks)
    assert histories[0] == histories[1] and len(histories[0]) == 3


def test_masks_are_saved_with_the_adapter(tmp_path):
    from peft import PeftModel

    model = tiny_model(mask_keep_ratio=0.5)
    train(model, 2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit_classifier(), tmp_path)
    assert loaded.base_model.layer_mask.current_keep() == model.base_model.layer_mask.current_keep()


def test_a_subspace_over_its_fit_bound_is_projected_not_masked():
    """The old rule masked a layer whose subspace crossed fit_bound * sigma_r, and a masked layer cannot shrink
    back, so it stayed frozen for good. Now the subspace is scaled back onto the bound and keeps training."""
    model = tiny_model(mask_keep_ratio=1.0, fit_bound=0.5)
    first = model.base_model.layer_mask.units[0]
    with torch.no_grad():
        first.layer.masm_s["default"][0].fill_(1e3)
    before = [p.detach().clone() for p in first.params("default")]
    train(model, 2)
    assert all(model.base_model.layer_mask.current_keep())
    norms = stacked.subspace_norms([first.layer], "default")[0]
    assert float(norms.max()) <= 0.5 * (1 + 1e-5)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, first.params("default"))]
    assert all(moved)


def test_a_masked_unit_comes_back_when_its_learning_state_says_so():
    """Masked units keep feeding the gradient statistics, so a later decision can keep them again."""
    model = tiny_model(mask_keep_ratio=0.5, mask_interval=3, mask_warmup=3, mask_ema_decay=0.5)
    controller = model.base_model.layer_mask
    train(model, 3)
    first = controller.current_keep()
    masked = [i for i, keep in enumerate(first) if not keep]
    assert masked
    # Make the masked units' gradients perfectly consistent (high GSNR) and the kept ones pure noise.
    signal = set(masked)
    hooks = []
    for i, unit in enumerate(controller.units):
        for p in unit.params("default"):
            if i in signal:
                hooks.append(p.register_hook(lambda g: torch.ones_like(g)))
            else:
                hooks.append(p.register_hook(lambda g: torch.randn_like(g)))
    train(model, 3, seed=1)
    for hook in hooks:
        hook.remove()
    second = controller.current_keep()
    assert all(second[i] for i in masked)
    summary = controller.decision_summary()
    assert summary[-1]["came_back"] == len(masked)
    assert summary[-1]["trained_units"] == sum(second) and summary[0]["units"] == len(first)


def test_none_mode_changes_nothing():
    model = tiny_model(layer_mask="none")
    train(model, 3)
    assert model.base_model.layer_mask.history_masks == []
    assert all(model.base_model.layer_mask.current_keep())


def test_static_calibration():
    model = tiny_model(layer_mask="static", mask_keep_ratio=0.25)

    def loss_fn(m, batch):
        return m(pixel_values=batch[0], labels=batch[1]).loss

    keep = calibrate_layer_mask(model, batches(3), loss_fn, num_batches=2)
    assert int(keep.sum()) == 2  # 25% of 8 layers
    assert all(p.grad is None for p in model.parameters())
    train(model, 2)
    assert model.base_model.layer_mask.current_keep() == [bool(k) for k in keep.tolist()]


def test_bad_input():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="found no gradient.*call it after loss.backward"):
        model.base_model.update_layer_mask()
    static = tiny_model(layer_mask="static")
    with pytest.raises(RuntimeError, match="needs a calibration first"):
        static.base_model.update_layer_mask()
    with pytest.raises(ValueError, match="empty data loader"):
        calibrate_layer_mask(static, [], lambda m, b: None, num_batches=2)
    with pytest.raises(ValueError, match="mask_keep_ratio must be a number in"):
        MASMConfig(mask_keep_ratio=0)
    with pytest.raises(ValueError, match="mask_interval must be a positive integer"):
        MASMConfig(mask_interval=-2)
    from peft_masm.training import find_masm_model

    with pytest.raises(ValueError, match="holds no MASM adapter"):
        find_masm_model(torch.nn.Linear(2, 2))


def test_heatmap_png(tmp_path):
    model = tiny_model(mask_keep_ratio=0.5)
    train(model, 5)
    path = plot_mask_history(model, tmp_path / "mask.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_trainer_integration(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    model = tiny_model(mask_keep_ratio=0.5, orthogonality_weight=0.1, spectral_weight=0.1)
    x, y = batches(1)[0]
    data = Dataset.from_dict(
        {"pixel_values": x.repeat(4, 1, 1, 1).numpy(), "labels": y.repeat(4).numpy()}
    ).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        learning_rate=1e-2,
    )
    trainer = peft_masm.MASMTrainer(model=model, args=args, train_dataset=data)
    assert any(isinstance(cb, peft_masm.MASMTrainerCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert model.base_model.layer_mask.history_steps == [1, 3, 5]


def _launch(tmp_path: Path, processes: int, *args: str) -> None:
    # Several CPU processes: accelerate's --cpu launcher needs mpirun; torch's launcher (--multi_gpu) with
    # Accelerator(cpu=True) in the script gives the same gloo process group without it.
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes)]
    command += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(SCRIPT),
        str(tmp_path),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


def _compare(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["history"], b["history"]) and torch.equal(a["history_steps"], b["history_steps"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _launch(tmp_path / "one", 1, "--steps", "8")
    _launch(tmp_path / "two", 2, "--steps", "8")
    single = torch.load(tmp_path / "one" / "final_rank0.pt")
    rank0 = torch.load(tmp_path / "two" / "final_rank0.pt")
    rank1 = torch.load(tmp_path / "two" / "final_rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # every process took the same decisions
    assert single["history_steps"].tolist() == [2, 4, 6, 8]
    _compare(rank0, single)


@pytest.mark.slow
def test_gradient_accumulation_and_resume(tmp_path):
    for name in ("full", "resumed", "accumulated"):
        (tmp_path / name).mkdir()
    _launch(tmp_path / "full", 1, "--steps", "8")
    _launch(tmp_path / "resumed", 1, "--steps", "8", "--stop_after", "4")
    _launch(tmp_path / "resumed", 1, "--steps", "8", "--resume")
    _launch(tmp_path / "accumulated", 1, "--steps", "8", "--accumulation", "2")
    full = torch.load(tmp_path / "full" / "final_rank0.pt")
    _compare(torch.load(tmp_path / "resumed" / "final_rank0.pt"), full)
    _compare(torch.load(tmp_path / "accumulated" / "final_rank0.pt"), full)


@pytest.mark.slow
def test_a_plain_accelerate_loop_matches_the_explicit_one_on_two_processes(tmp_path):
    """Issue 27: no MASM call in an accelerate loop (DDP on two CPU processes, gradient accumulation 2) trains as
    the loop that calls the regularisers and the mask itself. Not bit for bit: the explicit loop adds the
    regularisers to every micro-batch's loss on every rank (averaged by DDP and accumulation), the step hook adds
    their gradient once after synchronisation, so the sums are rounded in another order."""
    for name in ("explicit", "plain", "plain_accumulated"):
        (tmp_path / name).mkdir()
    _launch(tmp_path / "explicit", 2, "--steps", "8")
    _launch(tmp_path / "plain", 2, "--steps", "8", "--loop", "plain")
    _launch(tmp_path / "plain_accumulated", 1, "--steps", "8", "--loop", "plain", "--accumulation", "2")
    explicit = torch.load(tmp_path / "explicit" / "final_rank0.pt")
    rank0 = torch.load(tmp_path / "plain" / "final_rank0.pt")
    rank1 = torch.load(tmp_path / "plain" / "final_rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # every process took the same decisions
    assert rank0["num_steps"].item() == explicit["num_steps"].item() == 8
    _compare(rank0, explicit)
    _compare(torch.load(tmp_path / "plain_accumulated" / "final_rank0.pt"), explicit)


@pytest.mark.slow
def test_a_plain_accelerate_loop_resumes_as_if_uninterrupted(tmp_path):
    """The step count and the mask statistics are saved with accelerate's training state and restored."""
    for name in ("full", "resumed"):
        (tmp_path / name).mkdir()
    _launch(tmp_path / "full", 1, "--steps", "8", "--loop", "plain")
    _launch(tmp_path / "resumed", 1, "--steps", "8", "--loop", "plain", "--stop_after", "3")
    _launch(tmp_path / "resumed", 1, "--steps", "8", "--loop", "plain", "--resume")
    full = torch.load(tmp_path / "full" / "final_rank0.pt")
    resumed = torch.load(tmp_path / "resumed" / "final_rank0.pt")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
