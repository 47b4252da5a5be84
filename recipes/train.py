"""Train a deepfake detector (MASM or a PEFT LoRA baseline) with accelerate.

    accelerate launch recipes/train.py --config recipes/configs/<name>.yaml [--key value ...]
    python recipes/train.py --help          # every field, with its type, default and help

Every field of ``peft_masm.recipe.config.TrainConfig`` can be overridden on the command line
(``--learning_rate 1e-4``, ``--masm.num_subspaces 2``). One GPU, several GPUs, FSDP or several nodes: pick
an accelerate config from ``recipes/accelerate_configs/`` (see recipes/README.md).

The script reads top to bottom: configuration -> output folder -> backbone, detector and data ->
optimizer, scheduler and ``accelerator.prepare`` -> resume -> the training loop (one
``peft_masm.TrainingStep`` per batch, validation each epoch on held-out people of the training domain)
-> the best-on-validation detector saved with its model card, scored on the test sets, pushed if asked.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peft_masm.recipe.config import RESUME_WARN_FIELDS, ConfigError, TrainConfig, format_help, load_config

if TYPE_CHECKING:
    from peft_masm.tuner.step_hooks import StepState

CHECKPOINT_PREFIX = "step_"
RUN_FILE = "run_config.json"  # in every checkpoint: the run's identity fields, their hash and its files
# Files a run writes directly in output_dir (run_config.json: the JSON tracker's copy of the config).
RUN_OUTPUTS = frozenset(
    {"metrics.jsonl", RUN_FILE, "results.json", "results.md", "roc.png", "mask_history.png"}
)
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_config.yaml",
     "preprocessor_config.json", "detector_config.json"}
)  # fmt: skip
SCRATCH_PREFIXES = (".tmp-", ".old-")  # folders of a save that never finished (the recipe removes them whole)
TENSORBOARD_DIR = "masm"  # accelerate's TensorBoardTracker logs to logging_dir/<project name>
# The files accelerator.save_state writes here, for checkpoints whose RUN_FILE does not list its files (before 0.3).
LEGACY_CHECKPOINT_FILE = re.compile(
    r"adapter_state\.safetensors|(model|pytorch_model|optimizer|scheduler|sampler|random_states|"
    r"custom_checkpoint|scaler)(_\d+)?\.(bin|pkl|pt|safetensors)"
)


# --------------------------------------------------------------------------------------------- tracking
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
        row = {"step": step}
        row.update(
            {k: float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in values.items()}
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        pass


def make_trackers(cfg: TrainConfig) -> list[Any]:
    from accelerate.tracking import GeneralTracker

    tracker_cls = type("JSONLTracker", (JSONLTracker, GeneralTracker), {})
    out: list[Any] = []
    for name in cfg.report_to:
        if name in ("json", "jsonl"):
            out.append(tracker_cls("masm", cfg.output_dir))
        elif name != "none":
            out.append(name)  # tensorboard, wandb, ... when installed
    return out


# ------------------------------------------------------------------------------------- output folder
def outputs_to_replace(cfg: TrainConfig) -> list[Path]:
    """What ``--overwrite_output_dir`` removes: the earlier run's outputs (none when the folder is empty or
    the run resumes). A non-empty ``output_dir`` is refused without the flag (transformers' rule).

    Removing the old run means neither checkpoint rotation nor ``--resume_from_checkpoint latest`` can mix
    two runs. Only files this recipe wrote are removed: any other file raises :class:`ConfigError`
    naming it, before anything is deleted.
    """
    out = Path(cfg.output_dir)
    if not out.exists() or not any(out.iterdir()) or cfg.resume_from_checkpoint:
        return []
    if not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {out} already holds files (an earlier run?). Pass --overwrite_output_dir to replace that "
            "run, --resume_from_checkpoint latest to continue it, or choose another --output_dir."
        )
    return earlier_run_outputs(out)


def earlier_run_outputs(out: Path) -> list[Path]:
    """The entries of ``out`` an earlier run of this recipe wrote; raises if any file in them is not its own."""
    owned = []
    for entry in sorted(out.iterdir()):
        if entry.is_file() and entry.name in RUN_OUTPUTS:
            owned.append(entry)
        elif entry.is_dir() and entry.name in ("checkpoints", "adapter", TENSORBOARD_DIR):
            for folder, allowed in _own_files(entry):
                _check_files(folder, allowed)
            owned.append(entry)
        elif entry.is_dir() and entry.name.startswith(SCRATCH_PREFIXES):
            owned.append(entry)
        else:
            _check_files(entry, lambda rel: False)  # an empty folder passes, and stays
    return owned


def _own_files(entry: Path) -> list[tuple[Path, Callable[[str], bool]]]:
    """(folder, which of its files, by relative path, the recipe writes there) for an output folder."""
    if entry.name == "adapter":
        return [(entry, ADAPTER_FILES.__contains__)]
    if entry.name == TENSORBOARD_DIR:
        return [(entry, lambda rel: Path(rel).name.startswith("events.out.tfevents."))]
    parts: list[tuple[Path, Callable[[str], bool]]] = []
    for folder in sorted(entry.iterdir()):  # checkpoints/
        if folder.is_dir() and folder.name.startswith(SCRATCH_PREFIXES):
            continue
        parts.append((folder, _checkpoint_files(folder) if folder.is_dir() else lambda rel: False))
    return parts


def _checkpoint_files(folder: Path) -> Callable[[str], bool]:
    """Which files of ``folder`` its run file lists (nothing when it has none: not this recipe's)."""
    run = _checkpoint_run(folder)
    if not run:
        return lambda rel: False
    if "files" not in run:
        return lambda rel: rel == RUN_FILE or LEGACY_CHECKPOINT_FILE.fullmatch(rel) is not None
    return {RUN_FILE, *run["files"]}.__contains__


def _check_files(path: Path, allowed: Callable[[str], bool]) -> None:
    files = sorted(p for p in path.rglob("*") if not p.is_dir()) if path.is_dir() else [path]
    for file in files:
        if not allowed(file.relative_to(path).as_posix() if path.is_dir() else file.name):
            raise ConfigError(
                f"output_dir: {file} was not written by this recipe, so --overwrite_output_dir stops here and "
                "deletes nothing. Move that file away, or choose another --output_dir."
            )


def remove_outputs(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def run_hash(cfg: TrainConfig) -> str:
    """A hash of the fields that define what the run trains (not where it writes)."""
    identity = json.dumps(cfg.run_identity(), sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def list_checkpoints(root: Path, only_hash: str | None = None) -> list[Path]:
    """Checkpoint folders under ``root`` by step; ``only_hash`` keeps those written by that run."""
    found = []
    for path in root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        if path.is_dir() and path.name[len(CHECKPOINT_PREFIX) :].isdigit():
            if only_hash is None or _checkpoint_run(path).get("hash") == only_hash:
                found.append(path)
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _checkpoint_run(path: Path) -> dict[str, Any]:
    file = path / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def check_checkpoint_belongs(path: Path, cfg: TrainConfig, log: Any) -> None:
    """Raise if checkpoint ``path`` was written by a run with another configuration (warn for batch size,
    learning rate or epochs, which may change on resume)."""
    saved = _checkpoint_run(path)
    if not saved:
        raise ConfigError(
            f"{path} has no {RUN_FILE}: it was not written by this recipe; cannot check what it trains."
        )
    if saved.get("hash") == run_hash(cfg):
        return
    current, before = cfg.run_identity(), saved.get("identity", {})
    differ = sorted(k for k in set(current) | set(before) if current.get(k) != before.get(k))
    hard = [k for k in differ if k not in RESUME_WARN_FIELDS]
    if hard:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in hard[:6])
        raise ConfigError(
            f"checkpoint {path} belongs to a run with another configuration ({detail}). Resume with the same "
            "config, or start a new run in another --output_dir (or --overwrite_output_dir)."
        )
    for key in differ:
        warnings.warn(
            f"resuming with {key} {before.get(key)!r} -> {current.get(key)!r}", UserWarning, stacklevel=2
        )
        log(f"warning: resuming with {key} {before.get(key)!r} -> {current.get(key)!r}")


# ------------------------------------------------------------------------------------------ Ctrl-C
@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM) until the block is done, so that a save is never left half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


def interrupted_message(cfg: TrainConfig, state: Any) -> str:
    """The one line printed when the run is interrupted: where it was, and where a resume starts."""
    done = list_checkpoints(Path(cfg.output_dir) / "checkpoints", only_hash=run_hash(cfg))
    start = f"from checkpoint {done[-1].name}" if done else "no checkpoint yet: it starts over"
    return f"interrupted at step {state.global_step}; resume with --resume_from_checkpoint latest ({start})"


def run(cfg: TrainConfig) -> dict[str, Any] | None:
    """``training_function``; on Ctrl-C or SIGTERM one line on stderr instead of a traceback, and None."""
    state = TrainState()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `accelerate launch` terminates its child
    try:
        return training_function(cfg, state)
    except KeyboardInterrupt:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C cannot turn this into a traceback
    gc.collect()  # the run's frames are gone: its progress bar has closed on its own line
    if _is_main_process():
        print(interrupted_message(cfg, state), file=sys.stderr)
    return None


# -------------------------------------------------------------------------------------------- state
class TrainState:
    """Progress saved with every checkpoint (accelerate's ``register_for_checkpointing``). The step count is not
    kept here: ``global_step`` reads the training step's one count (for MASM the model's ``step_state``), which is
    registered for checkpointing on its own."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.steps: StepState | None = None

    @property
    def global_step(self) -> int:
        """Taken optimizer steps so far."""
        return 0 if self.steps is None else self.steps.num_steps

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "steps"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def classification_loss(
    model: torch.nn.Module, batch: dict[str, Any], class_weights: torch.Tensor | None
) -> Any:
    """Cross-entropy of the detector's logits (the regularisers are added by ``TrainingStep``)."""
    from peft_masm.detector import forward_logits

    device = next(model.parameters()).device
    logits = forward_logits(model, batch["pixel_values"].to(device)).float()
    return torch.nn.functional.cross_entropy(logits, batch["labels"].to(device), weight=class_weights)


# ---------------------------------------------------------------------------- adapter-only checkpoints
def save_adapter_state(
    accelerator: Any, adapter_only: bool, models: list, weights: list, output_dir: str
) -> None:
    """accelerate save hook: checkpoints hold the adapter, not the frozen backbone (except under FSDP)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not adapter_only:
        return
    if accelerator.is_main_process:
        state = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
        save_file(state, os.path.join(output_dir, "adapter_state.safetensors"))
    weights.clear()


def load_adapter_state(accelerator: Any, adapter_only: bool, models: list, input_dir: str) -> None:
    """accelerate load hook, the counterpart of :func:`save_adapter_state`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if adapter_only:
        unwrapped = accelerator.unwrap_model(models.pop())
        set_peft_model_state_dict(unwrapped, load_file(os.path.join(input_dir, "adapter_state.safetensors")))


def save_checkpoint(accelerator: Any, state: TrainState, cfg: TrainConfig) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when complete; rotates this run's checkpoints.

    Ctrl-C waits until the checkpoint is complete.
    """
    with interrupts_held():
        return _save_checkpoint(accelerator, state, cfg)


def _save_checkpoint(accelerator: Any, state: TrainState, cfg: TrainConfig) -> Path:
    root = Path(cfg.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        identity = {"hash": run_hash(cfg), "identity": cfg.run_identity(), "files": files}
        (tmp / RUN_FILE).write_text(json.dumps(identity, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if cfg.checkpoints_total_limit:
            for old in list_checkpoints(root, only_hash=run_hash(cfg))[: -cfg.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: TrainConfig, log: Any) -> Path | None:
    """The checkpoint to resume from (``latest`` or a path), checked to belong to this configuration."""
    if not cfg.resume_from_checkpoint:
        return None
    root = Path(cfg.output_dir) / "checkpoints"
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(root)
        if not found:
            log(f"no checkpoint under {root}; starting from scratch")
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume_from_checkpoint)
        if not path.is_dir():
            raise ConfigError(f"resume_from_checkpoint: {path} is not a checkpoint folder (or use 'latest').")
    check_checkpoint_belongs(path, cfg, log)
    return path


# ------------------------------------------------------------------------------------------ training
def training_function(cfg: TrainConfig, state: TrainState | None = None) -> dict[str, Any]:
    """Run the recipe; returns a summary (paths, best validation metric, test results).

    ``state`` (optional) is the progress object the run fills in, so a caller can say where it stopped.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from peft_masm.data import collate
    from peft_masm.detector import build_detector, load_image_processor, save_detector
    from peft_masm.evaluation import predict
    from peft_masm.metrics import compute_detection_metrics
    from peft_masm.recipe.data import build_data
    from peft_masm.training import TrainingStep, maybe_masm_model

    if cfg.push_to_hub:
        from peft_masm.hub import resolve_token

        resolve_token()  # a clear error (without any token text) before training starts
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=make_trackers(cfg) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    log = accelerator.print
    replaced = outputs_to_replace(cfg)  # every process checks: a file that is not ours stops them all
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_outputs(replaced)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume(cfg, log)
    if resume_path is None and accelerator.is_main_process:
        (Path(cfg.output_dir) / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    set_seed(cfg.seed)

    # Backbone and detector first (a bad adapter setting fails here, before the data is built).
    log(f"[1/4] backbone {cfg.backbone!r} (offline aliases are prepared from packaged weights on first use)")
    with accelerator.main_process_first():
        processor = load_image_processor(cfg.backbone, cfg.image_size)
    log(f"[2/4] detector: {cfg.method} on {cfg.backbone} (pooling: {cfg.pooling})")
    peft_model = build_detector(cfg.backbone, cfg.adapter_config(), pooling=cfg.pooling)  # SVD once per rank
    masm = maybe_masm_model(peft_model)
    if accelerator.is_main_process:
        peft_model.print_trainable_parameters()
    with accelerator.main_process_first():
        source = (
            " (packaged real faces + synthesised forgeries)"
            if cfg.data == "synthetic"
            else f" {cfg.train_path}"
        )
        log(f"[3/4] data: {cfg.data}{source}")
        data = build_data(cfg, processor)
    tests = ", ".join(f"{name} ({len(ds)})" for name, ds in data.tests.items()) or "none"
    log(f"      train {len(data.train)}, validation {len(data.val)}, test sets: {tests}")

    counts = torch.bincount(torch.tensor(data.train_labels), minlength=2).float()
    class_weights = (counts.sum() / (2 * counts)).to(accelerator.device) if cfg.balance_classes else None
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    # The scheduler counts the steps of all processes together (accelerate steps it once per process).
    scheduler_steps = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps) * cfg.epochs
    scheduler = make_scheduler(cfg, optimizer, scheduler_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(
        peft_model, optimizer, train_loader, scheduler
    )
    # This process's optimizer steps: the prepared loader holds its share of the batches.
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    state = TrainState() if state is None else state
    adapter_only = accelerator.distributed_type != DistributedType.FSDP
    accelerator.register_save_state_pre_hook(partial(save_adapter_state, accelerator, adapter_only))
    accelerator.register_load_state_pre_hook(partial(load_adapter_state, accelerator, adapter_only))
    step = TrainingStep(
        model,
        optimizer,
        partial(classification_loss, class_weights=class_weights),
        accelerator=accelerator,
        scheduler=scheduler,
        max_grad_norm=cfg.max_grad_norm,
        on_non_finite=cfg.on_non_finite,
        masm_model=masm,
    )
    state.steps = step.step_state
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(step.step_state)
    if masm is not None:
        accelerator.register_for_checkpointing(masm.layer_mask)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        log(f"resumed from {resume_path} (step {state.global_step}, epoch {state.epoch})")
    if (
        masm is not None
        and masm.peft_config["default"].layer_mask == "static"
        and not masm.layer_mask.calibrated
    ):
        # The same unsharded batches on every rank: every rank takes the same decision.
        calibration = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        step.calibrate(calibration, cfg.mask_calibration_batches)

    log(
        f"[4/4] training {cfg.epochs} epoch(s), {steps_per_epoch} optimizer steps each, on "
        f"{accelerator.num_processes} process(es) ({accelerator.device})"
    )
    scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("masm", config=scalars)
    progress = tqdm(
        total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process
    )
    t0 = time.time()
    stopped = False
    adapter_dir = Path(cfg.output_dir) / "adapter"
    model.train()
    while state.epoch < cfg.epochs and not stopped:
        train_loader.set_epoch(state.epoch)
        skip = state.step_in_epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        running, seen = 0.0, 0
        for batch in loader:
            out = step(batch)
            state.step_in_epoch += 1
            running += out.loss
            seen += 1
            if not out.optimizer_step:
                continue
            progress.update(1)
            if out.skipped:  # not taken: the step count did not advance
                continue
            if state.global_step % cfg.logging_steps == 0:
                row = {
                    "train/loss": running / seen,
                    "train/lr": scheduler.get_last_lr()[0],
                    "epoch": state.epoch,
                }
                row.update({f"train/{k}": v for k, v in out.regularization.items()})
                accelerator.log(row, step=state.global_step)
                progress.set_postfix(loss=f"{running / seen:.4f}")
                running, seen = 0.0, 0
            due = bool(cfg.checkpointing_steps) and state.global_step % (cfg.checkpointing_steps or 1) == 0
            if due:
                save_checkpoint(accelerator, state, cfg)
            if cfg.stop_after_step is not None and state.global_step >= cfg.stop_after_step:
                if not due:
                    save_checkpoint(accelerator, state, cfg)
                stopped = True
                break
        if stopped:
            break
        # End of epoch: validate on the held-out split of the training domain (never on a test set).
        labels, scores, _, val_loss = predict(model, data.val, cfg.eval_batch_size, accelerator=accelerator)
        val_auc = compute_detection_metrics(labels, scores, n_bootstrap=0)["frame_auc"]
        metric = val_auc if cfg.metric_for_best == "auc" else -val_loss
        accelerator.log(
            {"val/auc": val_auc, "val/loss": val_loss, "epoch": state.epoch}, step=state.global_step
        )
        improved = state.best_metric is None or metric > state.best_metric
        best = " (best so far)" if improved else ""
        log(
            f"epoch {state.epoch}: val AUC {val_auc:.4f}, val loss {val_loss:.4f}{best} [{time.time() - t0:.0f}s]"
        )
        if improved:
            state.best_metric, state.best_epoch = float(metric), state.epoch
            if accelerator.is_main_process:
                with interrupts_held():
                    save_detector(accelerator.unwrap_model(model), adapter_dir, image_processor=processor,
                                  training_config=cfg.to_dict(), synthetic_benchmark=cfg.data == "synthetic",
                                  repo_id=cfg.hub_model_id)  # fmt: skip
        accelerator.wait_for_everyone()
        state.epoch += 1
        state.step_in_epoch = 0
        save_checkpoint(accelerator, state, cfg)
    progress.close()
    summary: dict[str, Any] = {
        "output_dir": cfg.output_dir,
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
        summary.update(finish(cfg, accelerator.unwrap_model(model), data, processor, log))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def finish(cfg: TrainConfig, model: torch.nn.Module, data: Any, processor: Any, log: Any) -> dict[str, Any]:
    """Main process: mask heatmap, test-set scores of the best-on-validation adapter, model card, Hub push."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from peft_masm.detector import push_detector_to_hub, save_detector
    from peft_masm.evaluation import score_sets
    from peft_masm.training import maybe_masm_model

    out_dir, adapter_dir = Path(cfg.output_dir), Path(cfg.output_dir) / "adapter"
    written: dict[str, Any] = {}
    masm = maybe_masm_model(model)
    if masm is not None and cfg.plot_mask and masm.peft_config["default"].layer_mask != "none":
        from peft_masm.visualization import plot_mask_history

        with interrupts_held():
            written["mask_plot"] = str(plot_mask_history(model, out_dir / "mask_history.png"))
    set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    results = None
    if data.tests:
        log("scoring the best-on-validation adapter on the test sets:")
        results = score_into(out_dir, partial(score_sets, model, data.tests, batch_size=cfg.eval_batch_size,
                             n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, log=log, subsets=data.test_subsets))  # fmt: skip
        written.update(
            results_json=str(out_dir / "results.json"),
            results_md=str(out_dir / "results.md"),
            roc_plot=str(out_dir / "roc.png"),
            results=results,
        )
    with interrupts_held():
        save_detector(model, adapter_dir, image_processor=processor, training_config=cfg.to_dict(),
                      eval_results=results, synthetic_benchmark=cfg.data == "synthetic", repo_id=cfg.hub_model_id)  # fmt: skip
    written["model_card"] = str(adapter_dir / "README.md")
    if cfg.push_to_hub:
        assert cfg.hub_model_id is not None  # checked when the config was parsed
        written["hub_commit"] = push_detector_to_hub(adapter_dir, cfg.hub_model_id, private=cfg.hub_private)
        log(f"pushed the adapter to {cfg.hub_model_id}: {written['hub_commit']}")
    return written


def score_into(out_dir: Path, score: Callable[..., Any]) -> Any:
    """``score(out_dir=...)`` in a scratch folder, its files moved into ``out_dir`` when all are written."""
    scratch = out_dir / ".tmp-results"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        results = score(out_dir=scratch)
        with interrupts_held():
            for file in sorted(scratch.iterdir()):
                file.replace(out_dir / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------- CLI
def split_config_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(--config path, the other arguments)``."""
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == "--config":
            if i + 1 >= len(rest):
                raise ConfigError("--config needs a path, e.g. --config recipes/configs/demo.yaml")
            path = rest[i + 1]
            del rest[i : i + 2]
            return path, rest
        if arg.startswith("--config="):
            del rest[i]
            return arg.split("=", 1)[1], rest
    return None, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        return 0
    from peft_masm.data import DataError
    from peft_masm.detector import BackboneNotAvailableError
    from peft_masm.hub import AdapterPushError

    try:
        config_path, overrides = split_config_argument(argv)
        if config_path is None:
            print(format_help().split("\n\n")[0], file=sys.stderr)
            print(
                "error: --config is required (examples in recipes/configs/; --help lists every field)",
                file=sys.stderr,
            )
            return 2
        cfg = load_config(config_path, overrides)
        summary = run(cfg)
        if summary is None:
            return 130  # interrupted (Ctrl-C), as a shell reports it
    except (ConfigError, DataError, BackboneNotAvailableError, AdapterPushError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the config is read (run() reports one during the run)
        print("interrupted before training started", file=sys.stderr)
        return 130
    except ValueError as err:  # a bad adapter setting found at injection (e.g. K*k above a layer's rank)
        if "MASM" not in str(err) and "K*k" not in str(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not summary.get("stopped_early") and "adapter_dir" in summary and _is_main_process():
        print_summary(summary)
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def print_summary(summary: dict[str, Any]) -> None:
    print("\nDone. Outputs:")
    print(f"  adapter (best on validation, with model card): {summary['adapter_dir']}")
    labels = {
        "results_json": "results",
        "results_md": "results table",
        "roc_plot": "ROC plot",
        "mask_plot": "layer-mask heatmap",
        "hub_commit": "Hub commit",
    }
    for key, label in labels.items():
        if key in summary:
            print(f"  {label}: {summary[key]}")


if __name__ == "__main__":
    sys.exit(main())
