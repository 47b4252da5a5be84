"""The recipe's output folder and checkpoints: what ``--overwrite_output_dir`` may remove (only this recipe's own
files), which run a checkpoint belongs to (a hash of the fields that define what it trains), checkpoints written
whole (a temporary folder renamed when complete) and rotated, and where ``--resume_from_checkpoint`` starts.

A checkpoint is ``accelerator.save_state`` (the adapter only, not the frozen backbone, except under FSDP) with the
run's progress (:class:`TrainState`), the training step's step count and MASM's layer-mask statistics registered
for checkpointing, and ``run_config.json``: the run's identity, its hash and the checkpoint's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RESUME_WARN_FIELDS, ConfigError, TrainConfig
from .interrupts import interrupts_held
from .tracking import METRICS_FILE, RUN_CONFIG_FILE

if TYPE_CHECKING:
    from ..tuner.step_hooks import StepState

__all__ = [
    "CheckpointMismatchError",
    "OutputDirError",
    "TrainState",
    "check_checkpoint_belongs",
    "earlier_run_outputs",
    "interrupted_message",
    "list_checkpoints",
    "outputs_to_replace",
    "prepare_output_dir",
    "register_checkpointing",
    "remove_outputs",
    "resolve_resume",
    "run_hash",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "step_"
RUN_FILE = "run_config.json"  # in every checkpoint: the run's identity fields, their hash and its files
# Files a run writes directly in output_dir.
RUN_OUTPUTS = frozenset(
    {METRICS_FILE, RUN_CONFIG_FILE, "results.json", "results.md", "roc.png", "mask_history.png"}
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


class OutputDirError(ConfigError):
    """``output_dir`` holds an earlier run (and no ``--overwrite_output_dir``), or a file this recipe did not write."""


class CheckpointMismatchError(ConfigError):
    """The checkpoint to resume from was written by a run with another configuration (or not by this recipe)."""


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


def prepare_output_dir(accelerator: Any, cfg: TrainConfig, log: Callable[[str], Any]) -> Path | None:
    """Clear the earlier run's outputs (``--overwrite_output_dir``; every process checks, the main one removes)
    and return the checkpoint to resume from (None: a new run, which starts a new ``metrics.jsonl``)."""
    replaced = outputs_to_replace(cfg)  # a file that is not ours stops every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_outputs(replaced)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume(cfg, log)
    if resume_path is None and accelerator.is_main_process:
        (Path(cfg.output_dir) / METRICS_FILE).unlink(missing_ok=True)
    return resume_path


def outputs_to_replace(cfg: TrainConfig) -> list[Path]:
    """What ``--overwrite_output_dir`` removes: the earlier run's outputs (none when the folder is empty or
    the run resumes). A non-empty ``output_dir`` is refused without the flag (transformers' rule).

    Removing the old run means neither checkpoint rotation nor ``--resume_from_checkpoint latest`` can mix
    two runs. Only files this recipe wrote are removed: any other file raises :class:`OutputDirError`
    naming it, before anything is deleted.
    """
    out = Path(cfg.output_dir)
    if not out.exists() or not any(out.iterdir()) or cfg.resume_from_checkpoint:
        return []
    if not cfg.overwrite_output_dir:
        raise OutputDirError(
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
            raise OutputDirError(
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
        raise CheckpointMismatchError(
            f"{path} has no {RUN_FILE}: it was not written by this recipe; cannot check what it trains."
        )
    if saved.get("hash") == run_hash(cfg):
        return
    current, before = cfg.run_identity(), saved.get("identity", {})
    differ = sorted(k for k in set(current) | set(before) if current.get(k) != before.get(k))
    hard = [k for k in differ if k not in RESUME_WARN_FIELDS]
    if hard:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in hard[:6])
        raise CheckpointMismatchError(
            f"checkpoint {path} belongs to a run with another configuration ({detail}). Resume with the same "
            "config, or start a new run in another --output_dir (or --overwrite_output_dir)."
        )
    for key in differ:
        warnings.warn(
            f"resuming with {key} {before.get(key)!r} -> {current.get(key)!r}", UserWarning, stacklevel=2
        )
        log(f"warning: resuming with {key} {before.get(key)!r} -> {current.get(key)!r}")


def interrupted_message(cfg: TrainConfig, state: TrainState) -> str:
    """The one line printed when the run is interrupted: where it was, and where a resume starts."""
    done = list_checkpoints(Path(cfg.output_dir) / "checkpoints", only_hash=run_hash(cfg))
    start = f"from checkpoint {done[-1].name}" if done else "no checkpoint yet: it starts over"
    return f"interrupted at step {state.global_step}; resume with --resume_from_checkpoint latest ({start})"


def register_checkpointing(accelerator: Any, state: TrainState, step: Any) -> None:
    """What a checkpoint holds besides accelerate's own state: the adapter only (not the frozen backbone; under
    FSDP the full sharded state), ``state``, the training step's one step count (``state.global_step`` reads it)
    and, for MASM, the layer-mask statistics."""
    from accelerate.utils import DistributedType

    adapter_only = accelerator.distributed_type != DistributedType.FSDP
    accelerator.register_save_state_pre_hook(partial(save_adapter_state, accelerator, adapter_only))
    accelerator.register_load_state_pre_hook(partial(load_adapter_state, accelerator, adapter_only))
    state.steps = step.step_state
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(step.step_state)
    if step.masm is not None:
        accelerator.register_for_checkpointing(step.masm.layer_mask)


def save_adapter_state(
    accelerator: Any, adapter_only: bool, models: list, weights: list, output_dir: str
) -> None:
    """accelerate save hook: checkpoints hold the adapter, not the frozen backbone (except under FSDP)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..detector import embedding_layers_to_save

    if not adapter_only:
        return
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(models[0])
        # What PEFT's "auto" decides, without its Hub look-up of the base (a warning for an offline alias).
        state = get_peft_model_state_dict(model, save_embedding_layers=embedding_layers_to_save(model))
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
