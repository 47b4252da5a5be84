"""Train a deepfake detector (MASM or a LoRA baseline) with accelerate.

    accelerate launch recipes/train.py --config recipes/configs/<name>.yaml [--key value ...]

Every field of :class:`recipe_config.TrainConfig` can be overridden on the command line
(``--learning_rate 1e-4``, ``--masm.num_subspaces 2``). One GPU, several GPUs, FSDP or several nodes:
pick an accelerate config from ``recipes/accelerate_configs/`` (see recipes/README.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peft_masm.recipe.config import ConfigError, TrainConfig, load_config

CHECKPOINT_PREFIX = "step_"


# ---------------------------------------------------------------------------------------------- helpers
class JSONLTracker:
    """A dependency-free accelerate tracker: one JSON object per ``log`` call in ``metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        row = {
            "step": step,
            **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        pass


def _trackers(cfg: TrainConfig) -> list[Any]:
    from accelerate.tracking import GeneralTracker

    tracker_cls = type("JSONLTracker", (JSONLTracker, GeneralTracker), {})
    out: list[Any] = []
    for name in cfg.report_to:
        if name in ("json", "jsonl"):
            out.append(tracker_cls("masm", cfg.output_dir))
        elif name != "none":
            out.append(name)  # tensorboard, wandb, ... when installed
    return out


def _atomic_replace(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``; an older ``final`` is removed only after that."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _checkpoints(root: Path) -> list[Path]:
    found = [
        p
        for p in root.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


class TrainState:
    """Progress saved with every checkpoint (accelerate's ``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _peft_config(cfg: TrainConfig) -> Any:
    if cfg.method == "masm":
        from peft_masm import MASMConfig

        return MASMConfig(**cfg.masm)
    from peft import LoraConfig

    return LoraConfig(**cfg.lora)


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def _check_hub(cfg: TrainConfig) -> None:
    if cfg.push_to_hub:
        from peft_masm.hub import resolve_token

        resolve_token()  # raises a clear error (without any token text) before training starts


# ------------------------------------------------------------------------------------------------- main
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the recipe; returns a summary (paths, best validation metric, test results)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration, set_seed
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    import peft_masm
    from peft_masm.detector import build_detector, forward_logits, load_image_processor

    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    adapter_dir = out_dir / "adapter"
    _check_hub(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=_trackers(cfg) or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    log = accelerator.print
    set_seed(cfg.seed)

    # Everything that can fail on bad input happens here, before any training step.
    with accelerator.main_process_first():
        log(
            f"[1/4] backbone {cfg.backbone!r} (offline aliases are prepared from packaged weights on first use)"
        )
        processor = load_image_processor(cfg.backbone, cfg.image_size)
        from peft_masm.recipe.data import build_data, collate

        log(
            f"[2/4] data: {cfg.data}"
            + (
                " (packaged real faces + synthesised forgeries)"
                if cfg.data == "synthetic"
                else f" from {cfg.train_path}"
            )
        )
        data = build_data(cfg, processor)
        log(
            f"      train {len(data.train)}, validation {len(data.val)}, test sets: "
            + (", ".join(f"{k} ({len(v)})" for k, v in data.tests.items()) or "none")
        )
    log(f"[3/4] detector: {cfg.method} on {cfg.backbone}")
    peft_model = build_detector(cfg.backbone, _peft_config(cfg))  # MASM's SVD runs here, once, on every rank
    is_masm = cfg.method == "masm"
    masm = peft_model.base_model if is_masm else None
    if accelerator.is_main_process:
        peft_model.print_trainable_parameters()

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits = forward_logits(model, batch["pixel_values"]).float()
        task = torch.nn.functional.cross_entropy(
            logits, batch["labels"].to(logits.device), weight=class_weights
        )
        return task + masm.regularization_loss()["total"] if is_masm else task

    counts = torch.bincount(torch.tensor(data.train_labels), minlength=2).float()
    class_weights = (counts.sum() / (2 * counts)) if cfg.balance_classes else None
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=generator,
        drop_last=False,
    )
    if (
        is_masm
        and peft_model.peft_config["default"].layer_mask == "static"
        and cfg.resume_from_checkpoint is None
    ):
        calib = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        peft_masm.calibrate_layer_mask(peft_model, calib, loss_fn, num_batches=cfg.mask_calibration_batches)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = _scheduler(cfg, optimizer, total_steps)
    if class_weights is not None:
        class_weights = class_weights.to(accelerator.device)
    model, optimizer, train_loader, scheduler = accelerator.prepare(
        peft_model, optimizer, train_loader, scheduler
    )
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if is_masm:
        accelerator.register_for_checkpointing(masm.layer_mask)

    # Checkpoints hold the adapter only (not the frozen backbone), except under FSDP (sharded parameters).
    from accelerate.utils import DistributedType

    adapter_only = accelerator.distributed_type != DistributedType.FSDP

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if adapter_only and accelerator.is_main_process:
            save_file(
                get_peft_model_state_dict(accelerator.unwrap_model(models[0])),
                os.path.join(output_dir, "adapter_state.safetensors"),
            )
        if adapter_only:
            while weights:
                weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        if adapter_only:
            unwrapped = accelerator.unwrap_model(models.pop())
            state_dict = load_file(os.path.join(input_dir, "adapter_state.safetensors"))
            set_peft_model_state_dict(unwrapped, state_dict)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    def save_checkpoint() -> Path:
        final = ckpt_root / f"{CHECKPOINT_PREFIX}{state.global_step}"
        tmp = ckpt_root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _atomic_replace(tmp, final)
            if cfg.checkpoints_total_limit:
                for old in _checkpoints(ckpt_root)[: -cfg.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def save_adapter(target: Path) -> None:
        """Adapter-only ``save_pretrained`` (atomic) with the processor used in training."""
        if not accelerator.is_main_process:
            return
        tmp = target.with_name(f".tmp-{target.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        from peft_masm.hub import save_training_config

        save_training_config(tmp, cfg.to_dict())
        _atomic_replace(tmp, target)

    # Resume.
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            found = _checkpoints(ckpt_root) if ckpt_root.is_dir() else []
            path = found[-1] if found else None
            if path is None:
                log(f"no checkpoint under {ckpt_root}; starting from scratch")
        else:
            path = Path(cfg.resume_from_checkpoint)
            if not path.is_dir():
                raise ConfigError(
                    f"resume_from_checkpoint: {path} is not a checkpoint folder (or use 'latest')."
                )
        if path is not None:
            accelerator.load_state(str(path))
            log(f"resumed from {path} (step {state.global_step}, epoch {state.epoch})")

    log(
        f"[4/4] training {cfg.epochs} epoch(s), {steps_per_epoch} optimizer steps each, on {accelerator.num_processes} "
        f"process(es) ({accelerator.device})"
    )
    accelerator.init_trackers(
        "masm", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
    )
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    t0 = time.time()
    stopped = False
    model.train()
    while state.epoch < cfg.epochs and not stopped:
        train_loader.set_epoch(state.epoch)
        loader = (
            accelerator.skip_first_batches(train_loader, state.step_in_epoch)
            if state.step_in_epoch
            else train_loader
        )
        running, seen = 0.0, 0
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if is_masm:
                        masm.update_layer_mask()
                    if cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step_in_epoch += 1
            running += float(loss.detach())
            seen += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            if state.global_step % cfg.logging_steps == 0:
                accelerator.log(
                    {
                        "train/loss": running / seen,
                        "train/lr": scheduler.get_last_lr()[0],
                        "epoch": state.epoch,
                    },
                    step=state.global_step,
                )
                progress.set_postfix(loss=f"{running / seen:.4f}")
                running, seen = 0.0, 0
            if cfg.checkpointing_steps and state.global_step % cfg.checkpointing_steps == 0:
                save_checkpoint()
            if cfg.stop_after_step is not None and state.global_step >= cfg.stop_after_step:
                if not (cfg.checkpointing_steps and state.global_step % cfg.checkpointing_steps == 0):
                    save_checkpoint()
                stopped = True
                break
        if stopped:
            break
        # End of epoch: validate on the held-out split of the training domain.
        from peft_masm.evaluation import predict

        labels, scores, vids, val_loss = predict(
            model, data.val, cfg.eval_batch_size, accelerator=accelerator
        )
        from peft_masm.metrics import compute_detection_metrics

        val_auc = compute_detection_metrics(labels, scores, n_bootstrap=0)["frame_auc"]
        metric = val_auc if cfg.metric_for_best == "auc" else -val_loss
        accelerator.log(
            {"val/auc": val_auc, "val/loss": val_loss, "epoch": state.epoch}, step=state.global_step
        )
        improved = state.best_metric is None or metric > state.best_metric
        log(
            f"epoch {state.epoch}: val AUC {val_auc:.4f}, val loss {val_loss:.4f}"
            f"{' (best so far)' if improved else ''} [{time.time() - t0:.0f}s]"
        )
        if improved:
            state.best_metric, state.best_epoch = float(metric), state.epoch
            save_adapter(adapter_dir)
        accelerator.wait_for_everyone()
        state.epoch += 1
        state.step_in_epoch = 0
        save_checkpoint()
    progress.close()
    summary: dict[str, Any] = {
        "output_dir": str(out_dir),
        "stopped_early": stopped,
        "global_step": state.global_step,
    }
    if stopped:
        log(
            f"stopped after step {state.global_step} (stop_after_step); resume with --resume_from_checkpoint latest"
        )
        accelerator.end_training()
        return summary
    summary.update(
        best_epoch=state.best_epoch, best_val_metric=state.best_metric, adapter_dir=str(adapter_dir)
    )
    if accelerator.is_main_process:
        summary.update(_finish(cfg, accelerator.unwrap_model(model), data, adapter_dir, out_dir, log))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _finish(
    cfg: TrainConfig, model: torch.nn.Module, data: Any, adapter_dir: Path, out_dir: Path, log: Any
) -> dict[str, Any]:
    """Main process: mask heatmap, test-set evaluation of the best adapter, model card, Hub push."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from peft_masm.detector import card_base_model
    from peft_masm.hub import push_adapter_to_hub, save_adapter_card

    written: dict[str, Any] = {}
    if cfg.method == "masm" and cfg.plot_mask and model.peft_config["default"].layer_mask != "none":
        from peft_masm import plot_mask_history

        written["mask_plot"] = str(plot_mask_history(model, out_dir / "mask_history.png"))
    # Evaluate the checkpoint chosen on validation (never on a test set).
    set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    results = None
    if data.tests:
        from peft_masm.evaluation import score_sets

        log("evaluating the best-on-validation adapter on the test sets:")
        results = score_sets(
            model,
            data.tests,
            out_dir,
            cfg.eval_batch_size,
            cfg.n_bootstrap,
            cfg.seed,
            log=log,
            subsets=data.test_subsets,
        )
        written.update(
            results_json=str(out_dir / "results.json"),
            results_md=str(out_dir / "results.md"),
            roc_plot=str(out_dir / "roc.png"),
            results=results,
        )
    save_adapter_card(
        adapter_dir,
        base_model=card_base_model(cfg.backbone),
        training_config=cfg.to_dict(),
        eval_results=results,
        datasets=None,
        synthetic_benchmark=cfg.data == "synthetic",
        base_model_class="AutoModelForImageClassification",
        repo_id=cfg.hub_model_id,
    )
    written["model_card"] = str(adapter_dir / "README.md")
    if cfg.push_to_hub:
        url = push_adapter_to_hub(adapter_dir, cfg.hub_model_id, private=cfg.hub_private)
        written["hub_commit"] = url
        log(f"pushed the adapter to {cfg.hub_model_id}: {url}")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            print("error: --config needs a path, e.g. --config recipes/configs/demo.yaml", file=sys.stderr)
            return 2
        config_path = argv[i + 1]
        del argv[i : i + 2]
    elif any(a.startswith("--config=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--config="))
        config_path = argv.pop(i).split("=", 1)[1]
    from peft_masm.data import DataError
    from peft_masm.detector import BackboneNotAvailableError
    from peft_masm.hub import AdapterPushError

    try:
        cfg = load_config(config_path, argv)
        summary = train(cfg)
    except (ConfigError, DataError, BackboneNotAvailableError, AdapterPushError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not summary.get("stopped_early") and "adapter_dir" in summary and _is_main():
        _print_summary(summary)
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _print_summary(summary: dict[str, Any]) -> None:
    print("\nDone. Outputs:")
    print(f"  adapter (best on validation, with model card): {summary['adapter_dir']}")
    for key, label in (
        ("results_json", "results"),
        ("results_md", "results table"),
        ("roc_plot", "ROC plot"),
        ("mask_plot", "layer-mask heatmap"),
        ("hub_commit", "Hub commit"),
    ):
        if key in summary:
            print(f"  {label}: {summary[key]}")


if __name__ == "__main__":
    sys.exit(main())
