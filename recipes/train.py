"""Train a deepfake detector (MASM or a PEFT LoRA baseline) with accelerate.

    accelerate launch recipes/train.py --config recipes/configs/<name>.yaml [--key value ...]
    python recipes/train.py --help          # every field, with its type, default and help

Every field of ``peft_masm.recipe.config.TrainConfig`` can be overridden on the command line
(``--learning_rate 1e-4``, ``--masm.num_subspaces 2``). One GPU, several GPUs, FSDP or several nodes: pick
an accelerate config from ``recipes/accelerate_configs/`` (see recipes/README.md).

The script reads top to bottom: the detector, built from the config's adapter -> data -> optimizer, scheduler and
``accelerator.prepare`` -> resume -> the training loop (one ``peft_masm.TrainingStep`` per batch, a checkpoint
every ``checkpointing_steps`` and at each epoch's end, validation each epoch on held-out people of the training
domain) -> the best-on-validation detector scored on the test sets, saved with its model card, pushed if asked.
The bookkeeping lives in ``peft_masm.recipe``: ``config`` (YAML and command line), ``checkpoints`` (output folder,
checkpoints, rotation, resume), ``tracking`` (metrics.jsonl), ``interrupts`` (Ctrl-C) and ``run`` (exit codes).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peft_masm.data import collate
from peft_masm.detector import (
    MASMDetector,
    build_detector,
    load_image_processor,
)
from peft_masm.evaluation import predict, score_sets
from peft_masm.hub import resolve_token
from peft_masm.metrics import compute_detection_metrics
from peft_masm.recipe.checkpoints import (
    TrainState,
    prepare_output_dir,
    register_checkpointing,
    save_checkpoint,
)
from peft_masm.recipe.config import DetectorSettingError, TrainConfig
from peft_masm.recipe.data import RecipeData, build_data
from peft_masm.recipe.interrupts import interrupts_held, written_whole
from peft_masm.recipe.run import main
from peft_masm.recipe.step import prepare_training
from peft_masm.recipe.tracking import make_trackers
from peft_masm.training import TrainingStep


def training_function(cfg: TrainConfig, state: TrainState) -> dict[str, Any]:
    """Run the recipe; returns a summary (paths, best validation metric, test results). ``state`` is filled in as
    the run goes, so that the caller can say where an interrupted run stopped."""
    if cfg.push_to_hub:
        resolve_token()  # a clear error (without any token text) before training starts
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=make_trackers(cfg.report_to, cfg.output_dir) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    log = accelerator.print
    resume_path = prepare_output_dir(accelerator, cfg, log)  # the checkpoint to resume from, if any
    set_seed(cfg.seed)
    detector, data = build_detector_and_data(cfg, accelerator)
    step, train_loader = prepare_training(cfg, accelerator, detector.model, data)
    register_checkpointing(accelerator, state, step)  # progress, step count, mask statistics, adapter weights
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        log(f"resumed from {resume_path} (step {state.global_step}, epoch {state.epoch})")
    if step.masm is not None and cfg.adapter.layer_mask == "static" and not step.masm.layer_mask.calibrated:
        # The same unsharded batches on every rank: every rank takes the same decision.
        calibration = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        step.calibrate(calibration, cfg.mask_calibration_batches)

    stopped = train(cfg, accelerator, step, train_loader, data, detector, state)
    summary: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "stopped_early": stopped,
        "global_step": state.global_step,
    }
    if stopped:
        log(
            f"stopped after step {state.global_step} (stop_after_step); resume with --resume_from_checkpoint latest"
        )
    else:
        summary.update(best_epoch=state.best_epoch, best_val_metric=state.best_metric)
        summary["adapter_dir"] = str(Path(cfg.output_dir) / "adapter")
        if accelerator.is_main_process:
            summary.update(finish(cfg, detector, data, log))
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def build_detector_and_data(cfg: TrainConfig, accelerator: Accelerator) -> tuple[MASMDetector, RecipeData]:
    """The detector (first: a bad adapter setting fails before the data is built) and the data."""
    log = accelerator.print
    log(f"[1/4] backbone {cfg.backbone!r} (offline aliases are prepared from packaged weights on first use)")
    with accelerator.main_process_first():
        processor = load_image_processor(cfg.backbone, cfg.image_size)
    log(f"[2/4] detector: {cfg.method} on {cfg.backbone} (pooling: {cfg.pooling})")
    try:  # from the adapter config object the config was parsed into (build_detector copies it)
        peft_model = build_detector(cfg.backbone, cfg.adapter, pooling=cfg.pooling)  # MASM's SVD runs here
    except ValueError as err:  # the adapter does not fit this backbone (K*k at or above a layer's rank, ...)
        raise DetectorSettingError(str(err)) from err
    if accelerator.is_main_process:
        peft_model.print_trainable_parameters()
    with accelerator.main_process_first():
        synthetic = " (packaged real faces + synthesised forgeries)"
        log(f"[3/4] data: {cfg.data}{synthetic if cfg.data == 'synthetic' else ' ' + str(cfg.train_path)}")
        data = build_data(cfg, processor)
    tests = ", ".join(f"{name} ({len(ds)})" for name, ds in data.tests.items()) or "none"
    log(f"      train {len(data.train)}, validation {len(data.val)}, test sets: {tests}")
    return MASMDetector(peft_model, processor, training_config=cfg.to_dict()), data


def train(cfg: TrainConfig, accelerator: Accelerator, step: TrainingStep, train_loader: Any, data: RecipeData,
          detector: MASMDetector, state: TrainState) -> bool:  # fmt: skip
    """The epochs left (all, or from where a resumed run stopped); True if ``stop_after_step`` stopped the run."""
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)  # this process's share
    accelerator.print(f"[4/4] training {cfg.epochs} epoch(s), {steps_per_epoch} optimizer steps each, on "
                      f"{accelerator.num_processes} process(es) ({accelerator.device})")  # fmt: skip
    scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("masm", config=scalars)
    progress = tqdm(total=steps_per_epoch * cfg.epochs, initial=state.global_step,
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    t0 = time.time()
    step.model.train()
    with progress:
        while state.epoch < cfg.epochs:
            if train_epoch(cfg, accelerator, step, train_loader, state, progress):
                return True
            validate(cfg, accelerator, step.model, data, detector, state, t0)
            state.epoch += 1
            state.step_in_epoch = 0
            save_checkpoint(accelerator, state, cfg)
    return False


def train_epoch(cfg: TrainConfig, accelerator: Accelerator, step: TrainingStep, train_loader: Any,
                state: TrainState, progress: Any) -> bool:  # fmt: skip
    """One epoch, less the batches a resumed run already took; True if the run stops here (``stop_after_step``)."""
    train_loader.set_epoch(state.epoch)
    skip = state.step_in_epoch
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    running, seen = 0.0, 0
    for batch in loader:
        out = step(batch)
        state.step_in_epoch += 1
        running, seen = running + out.loss, seen + 1
        if not out.optimizer_step:
            continue
        progress.update(1)
        if out.skipped:  # not taken: the step count did not advance
            continue
        if state.global_step % cfg.logging_steps == 0:
            row = {
                "train/loss": running / seen,
                "train/lr": step.scheduler.get_last_lr()[0],
                "epoch": state.epoch,
            }
            row.update({f"train/{k}": v for k, v in out.regularization.items()})
            accelerator.log(row, step=state.global_step)
            progress.set_postfix(loss=f"{running / seen:.4f}")
            running, seen = 0.0, 0
        stop = cfg.stop_after_step is not None and state.global_step >= cfg.stop_after_step
        if stop or (cfg.checkpointing_steps and state.global_step % cfg.checkpointing_steps == 0):
            save_checkpoint(accelerator, state, cfg)
        if stop:
            return True
    return False


def validate(cfg: TrainConfig, accelerator: Accelerator, model: Any, data: RecipeData, detector: MASMDetector,
             state: TrainState, t0: float) -> None:  # fmt: skip
    """Validation on the held-out split of the training domain (never a test set); the best epoch is saved."""
    labels, scores, _, val_loss = predict(model, data.val, cfg.eval_batch_size, accelerator=accelerator)
    val_auc = compute_detection_metrics(labels, scores, n_bootstrap=0)["frame_auc"]
    metric = val_auc if cfg.metric_for_best == "auc" else -val_loss
    accelerator.log({"val/auc": val_auc, "val/loss": val_loss, "epoch": state.epoch}, step=state.global_step)
    improved = state.best_metric is None or metric > state.best_metric
    best = " (best so far)" if improved else ""
    accelerator.print(f"epoch {state.epoch}: val AUC {val_auc:.4f}, val loss {val_loss:.4f}{best} "
                      f"[{time.time() - t0:.0f}s]")  # fmt: skip
    if improved:
        state.best_metric, state.best_epoch = float(metric), state.epoch
        if accelerator.is_main_process:
            save_adapter(cfg, detector)  # detector.model is the model being trained, unwrapped
    accelerator.wait_for_everyone()


def save_adapter(cfg: TrainConfig, detector: MASMDetector, results: Any = None) -> None:
    """``output_dir/adapter``: the adapter, its image processor, training config and model card (Ctrl-C waits)."""
    with interrupts_held():
        detector.save_pretrained(Path(cfg.output_dir) / "adapter", eval_results=results, repo_id=cfg.hub_model_id,
                                 synthetic_benchmark=cfg.data == "synthetic")  # fmt: skip


def finish(cfg: TrainConfig, detector: MASMDetector, data: RecipeData, log: Any) -> dict[str, Any]:
    """Main process: mask heatmap, test-set scores of the best-on-validation adapter, model card, Hub push."""
    out_dir, adapter_dir, model = Path(cfg.output_dir), Path(cfg.output_dir) / "adapter", detector.model
    written: dict[str, Any] = {}
    if cfg.method == "masm" and cfg.plot_mask and cfg.adapter.layer_mask != "none":
        from peft_masm.visualization import plot_mask_history

        with interrupts_held():
            written["mask_plot"] = str(plot_mask_history(model, out_dir / "mask_history.png"))
    set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    results = None
    if data.tests:
        log("scoring the best-on-validation adapter on the test sets:")
        results = written_whole(out_dir, lambda scratch: score_sets(model, data.tests, out_dir=scratch, log=log,
                                batch_size=cfg.eval_batch_size, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                subsets=data.test_subsets))  # fmt: skip
        written.update(results_json=str(out_dir / "results.json"), results_md=str(out_dir / "results.md"),
                       roc_plot=str(out_dir / "roc.png"), results=results)  # fmt: skip
    save_adapter(cfg, detector, results)
    written["model_card"] = str(adapter_dir / "README.md")
    if cfg.push_to_hub:
        assert cfg.hub_model_id is not None  # checked when the config was parsed
        written["hub_commit"] = detector.push_to_hub(cfg.hub_model_id, private=cfg.hub_private, eval_results=results,
                                                     synthetic_benchmark=cfg.data == "synthetic")  # fmt: skip
        log(f"pushed the adapter to {cfg.hub_model_id}: {written['hub_commit']}")
    return written


if __name__ == "__main__":
    sys.exit(main(training_function))
