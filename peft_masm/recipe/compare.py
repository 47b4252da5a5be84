"""Which method generalises best on a recipe's data: the runs of ``recipes/compare.py`` and where they are kept.

A comparison trains every method (an experiment file, :mod:`peft_masm.recipe.methods`) on the config's training
data with the recipe's own training step (:func:`peft_masm.recipe.step.prepare_training`), in three stages:

1. ``sweep``: each method whose grid has several learning rates trains once per rate (the first seed); the rate
   with the best validation metric (``metric_for_best``, on the config's validation split only) is chosen;
2. ``test``: each method trains once per seed at its chosen rate; the best-on-validation epoch scores every test
   set of the config, once;
3. ``noise``: the reference method trains again with other seeds (``seed + 100 + i``): the noise floor.

Every finished run is one JSON file under ``OUTPUT_DIR/runs/``, so a stopped comparison resumes run by run; a run
whose method file changed since it ran is run again. The data are built once and shared by every run, so paired
runs see the same test items.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..evaluation import predict
from ..metrics.paired import frame_auc
from . import methods as registry
from .config import ConfigError, DetectorSettingError, TrainConfig
from .data import RecipeData
from .step import optimizer_steps, prepare_training

__all__ = ["NOISE_SEED_OFFSET", "ComparePlan", "Run", "RunStore", "train_run"]

NOISE_SEED_OFFSET = 100  # the noise floor's seeds: seed + 100, seed + 101, ...
Stage = Literal["sweep", "test", "noise"]
# fields of the config that the comparison sets itself, per run or per method
_PER_RUN_FIELDS = ("learning_rate", "seed", "method", "masm", "lora", "output_dir")


@dataclass(frozen=True)
class Run:
    """One training run: a method at a learning rate and seed, in a stage."""

    method: str
    stage: Stage
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{registry.method_name(self.method)}/{self.stage}-lr{self.learning_rate:g}-seed{self.seed}"


@dataclass
class ComparePlan:
    """The methods, seeds and learning-rate grids of a comparison, and the runs they make."""

    methods: list[str]
    reference: str
    seeds: list[int]
    # one grid for every method, or a grid per named method (the others keep their file's); None: each file's own
    learning_rates: list[float] | dict[str, list[float]] | None = None
    default_learning_rate: float = 2e-4  # for a method file without a grid
    grids: dict[str, list[float]] = field(init=False)

    def __post_init__(self) -> None:
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods names a method twice: {self.methods}")
        if self.reference not in self.methods:
            raise ConfigError(
                f"the reference method {self.reference!r} is not among --methods {','.join(self.methods)}; "
                f"add it, or pass --reference {self.methods[0]}."
            )
        if isinstance(self.learning_rates, dict) and set(self.learning_rates) - set(self.methods):
            raise ConfigError(f"--learning_rates names {sorted(set(self.learning_rates) - set(self.methods))}, not "
                              f"among --methods {','.join(self.methods)}")  # fmt: skip
        self.grids = {m: self._grid(m) for m in self.methods}

    def _grid(self, method: str) -> list[float]:
        try:
            own = registry.spec(method).get("learning_rates")
        except ValueError as err:  # an unknown method, or a method file with an unknown key
            raise ConfigError(str(err)) from err
        given = (
            self.learning_rates.get(method) if isinstance(self.learning_rates, dict) else self.learning_rates
        )
        grid = given or own or [self.default_learning_rate]
        if not all(isinstance(lr, (int, float)) and lr > 0 for lr in grid):
            raise ConfigError(f"method {method!r}: learning rates must be positive numbers, got {grid}")
        return [float(lr) for lr in grid]

    def sweep_runs(self) -> list[Run]:
        return [
            Run(m, "sweep", lr, self.seeds[0])
            for m in self.methods
            if len(self.grids[m]) > 1
            for lr in self.grids[m]
        ]

    def final_runs(self, chosen: dict[str, float]) -> list[Run]:
        runs = [Run(m, "test", chosen[m], s) for m in self.methods for s in self.seeds]
        noise = [
            Run(self.reference, "noise", chosen[self.reference], s + NOISE_SEED_OFFSET) for s in self.seeds
        ]
        return runs + noise

    def count(self) -> int:
        """How many runs the comparison makes in all."""
        return len(self.sweep_runs()) + len(self.methods) * len(self.seeds) + len(self.seeds)

    def describe(self) -> str:
        swept = sum(len(self.grids[m]) for m in self.methods if len(self.grids[m]) > 1)
        return (f"{self.count()} runs: {swept} to choose learning rates on validation, {len(self.methods)} methods x "
                f"{len(self.seeds)} seeds scored on the test sets, and {len(self.seeds)} noise-floor runs of "
                f"{self.reference} with other seeds")  # fmt: skip

    def choose(self, store: RunStore) -> dict[str, float]:
        """Each method's learning rate: its only one, or the best validation metric of its sweep (ties: the first
        rate of the grid)."""
        chosen = {}
        for m in self.methods:
            grid = self.grids[m]
            metrics = (
                [store.load(Run(m, "sweep", lr, self.seeds[0]))["val_metric"] for lr in grid]
                if len(grid) > 1
                else [0.0]
            )
            chosen[m] = grid[int(np.argmax(metrics))]
        return chosen


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What the config says about every run: its training fields (less those the comparison sets per run) and
    the test sets."""
    fields = {k: v for k, v in cfg.run_identity().items() if k not in _PER_RUN_FIELDS}
    return json.loads(json.dumps({**fields, "test_sets": cfg.test_sets}, sort_keys=True, default=str))


def run_identity(cfg: TrainConfig, run: Run) -> str:
    """A digest of what a run trains: the config (less what the comparison sets), the method file, rate and seed."""
    what = {"config": config_identity(cfg), "method": registry.spec(run.method), "lr": run.learning_rate,
            "seed": run.seed}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStore:
    """The finished runs of a comparison: one JSON file each under ``output_dir/runs/``."""

    def __init__(self, output_dir: str | Path, cfg: TrainConfig) -> None:
        self.root = Path(output_dir) / "runs"
        self.cfg = cfg

    def path(self, run: Run) -> Path:
        return self.root / f"{run.name}.json"

    def load(self, run: Run) -> dict[str, Any]:
        return json.loads(self.path(run).read_text())

    def done(self, run: Run) -> bool:
        """Whether ``run`` finished with the config and method file as they are now."""
        path = self.path(run)
        return path.is_file() and json.loads(path.read_text()).get("identity") == run_identity(self.cfg, run)

    def save(self, run: Run, result: dict[str, Any]) -> None:
        """Write the run's result whole (a temporary file renamed), so an interrupted write leaves no half file."""
        path = self.path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**result, "identity": run_identity(self.cfg, run)}) + "\n")
        tmp.replace(path)


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: the adapter's state (PEFT) or every trainable parameter (probe, full)."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        state = get_peft_model_state_dict(model, save_embedding_layers=False)  # no embedding layer is trained
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state, strict=False)


def _epochs(cfg: TrainConfig, step: Any, loader: Any) -> Iterator[int]:
    """Train epoch by epoch; yields after each epoch (for validation)."""
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        step.model.train()
        for batch in loader:
            step(batch)
        yield epoch


def video_ids(ds: Any) -> list[str]:
    """Each item's video id (its own index where the set has no videos), without decoding images."""
    plain = ds.with_format(None)
    if "video_id" not in plain.column_names:
        return [str(i) for i in range(len(plain))]
    return [str(v) for v in plain.select_columns(["video_id"])["video_id"]]


def _score_tests(model: Any, data: RecipeData, cfg: TrainConfig, accelerator: Any) -> dict[str, Any]:
    """Every test set (and subset) scored once: frame AUC and the fake probabilities (rounded to 1e-6)."""
    scored: dict[str, np.ndarray] = {}
    for name, ds in data.tests.items():
        labels, scores, _, _ = predict(
            model, ds, cfg.eval_batch_size, accelerator=accelerator, desc=f"test set {name!r}"
        )
        scored[name] = scores
    for name, (parent, rows) in data.test_subsets.items():
        scored[name] = scored[parent][np.asarray(rows, dtype=np.int64)]
    return {name: [round(float(s), 6) for s in scores] for name, scores in scored.items()}


def _training_batches(data: RecipeData, cfg: TrainConfig, seed: int) -> Callable[[int], Iterator[Any]]:
    """``n`` shuffled training batches, the same on every process (a method that chooses its layers from them)."""
    from torch.utils.data import DataLoader

    from ..data import collate

    def take(n: int) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            data.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator
        )
        return itertools.islice(iter(loader), n)

    return take


def train_run(
    run: Run,
    cfg: TrainConfig,
    data: RecipeData,
    accelerator: Any,
    context: dict[str, Any],
    score_tests: bool,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train ``run`` (the best epoch by ``cfg.metric_for_best`` on validation is kept) and, if ``score_tests``,
    score the test sets with it. Returns the run's record (no file is written here)."""
    from accelerate.utils import set_seed

    t0 = time.perf_counter()
    run_cfg = copy.copy(cfg)
    run_cfg.learning_rate, run_cfg.seed = run.learning_rate, run.seed
    set_seed(run.seed)
    try:
        model, after_step = registry.build_method_model(run.method, cfg.backbone, context, pooling=cfg.pooling,
                                                        batches=_training_batches(data, cfg, run.seed))  # fmt: skip
    except ValueError as err:  # the adapter does not fit this backbone (K*k at or above a layer's rank, ...)
        raise DetectorSettingError(f"method {run.method!r}: {err}") from err
    step, loader = prepare_training(run_cfg, accelerator, model, data, after_step)
    best: dict[str, Any] = {}
    for epoch in _epochs(run_cfg, step, loader):
        labels, scores, _, loss = predict(step.model, data.val, cfg.eval_batch_size, accelerator=accelerator)
        auc = frame_auc(labels, scores)
        metric = auc if cfg.metric_for_best == "auc" else -loss
        if not best or metric > best["val_metric"]:
            best = {"val_metric": float(metric), "val_auc": auc, "val_loss": loss, "epoch": epoch,
                    "state": _trained_state(model)}  # fmt: skip
    _restore(model, best.pop("state"))
    record = {"method": registry.method_name(run.method), "stage": run.stage, "learning_rate": run.learning_rate,
              "seed": run.seed, "trainable": registry.trainable_parameters(model), "taken_steps": step.step_state.num_steps,
              **best}  # fmt: skip
    if registry.spec(run.method).get("layer_selection"):
        record["layers"] = list(model.peft_config["default"].layers_to_transform)
    if score_tests:
        record["test_scores"] = _score_tests(step.model, data, cfg, accelerator)
    record["seconds"] = time.perf_counter() - t0
    del step, loader, model
    accelerator.free_memory()
    gc.collect()
    return record


def check_methods(methods: list[str], context: dict[str, Any]) -> None:
    """Build each method's config once before any run, so that a method this comparison cannot make (an expression
    it has no value for, a field its PEFT config does not take) stops it with one line."""
    for method in methods:
        try:
            registry.method_config(method, **context)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"method {method!r} cannot be built here: {err}") from err


def test_items(data: RecipeData) -> dict[str, dict[str, list[Any]]]:
    """Labels and video ids of every test set and subset (the same for every run)."""
    from .data import labels_of

    items: dict[str, dict[str, list[Any]]] = {
        name: {"labels": labels_of(ds), "video_ids": video_ids(ds)} for name, ds in data.tests.items()
    }
    for name, (parent, rows) in data.test_subsets.items():
        items[name] = {key: [items[parent][key][i] for i in rows] for key in ("labels", "video_ids")}
    return items


def run_context(cfg: TrainConfig, data: RecipeData) -> dict[str, Any]:
    """The names method files may use: the backbone's width and LayerNorms, and the run's optimizer steps."""
    return {**registry.backbone_context(cfg.backbone), "steps": optimizer_steps(cfg, len(data.train))}


OUTPUT_FILES = ("comparison.json", "summary.json", "table.md", "forest.png", "test_items.json")  # and runs/


@contextlib.contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """No transformers progress bar per model load (one per run): the comparison's own bar says where it is."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def claim_output_dir(output_dir: Path, cfg: TrainConfig, overwrite: bool) -> None:
    """Make ``output_dir`` this comparison's: new, or one holding the same config's runs (resumed). Another config's
    comparison, or a folder of other files, stops with one line; ``overwrite`` removes only a comparison's files."""
    import shutil

    identity = config_identity(cfg)
    marker = output_dir / "comparison.json"
    if overwrite:
        shutil.rmtree(output_dir / "runs", ignore_errors=True)
        for name in OUTPUT_FILES:
            (output_dir / name).unlink(missing_ok=True)
    elif marker.is_file():
        if json.loads(marker.read_text())["config"] != identity:
            raise ConfigError(f"{output_dir} holds a comparison of another config; pass another --output_dir, or "
                              "--overwrite_output_dir to remove its runs.")  # fmt: skip
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError(
            f"{output_dir} is not empty and holds no comparison; pass an empty or new --output_dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config": identity}, indent=1) + "\n")


def run_comparison(
    cfg: TrainConfig, plan: ComparePlan, output_dir: str | Path, *, overwrite: bool = False, n_bootstrap: int = 1000,
    log: Callable[[str], Any] = print,
) -> dict[str, Any] | None:  # fmt: skip
    """Run (or resume) every run of ``plan`` on ``cfg``'s data; the summary (main process; None elsewhere).

    Writes ``summary.json``, ``table.md`` and ``forest.png`` into ``output_dir``.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from tqdm.auto import tqdm

    from ..detector import load_image_processor
    from .compare_report import write_report
    from .data import build_data

    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))  # fmt: skip
    out = Path(output_dir)
    if accelerator.is_main_process:
        claim_output_dir(out, cfg, overwrite)
    accelerator.wait_for_everyone()
    log = accelerator.print if log is print else log
    with accelerator.main_process_first():
        data = build_data(cfg, load_image_processor(cfg.backbone, cfg.image_size))
    if not data.tests:
        raise ConfigError(
            "the config has no test set to compare the methods on; add test_sets (or test_families)."
        )
    store, context = RunStore(out, cfg), run_context(cfg, data)
    check_methods(plan.methods, context)
    # the final runs are known once the learning rates are chosen
    swept = all(store.done(r) for r in plan.sweep_runs())
    known = plan.sweep_runs() + (plan.final_runs(plan.choose(store)) if swept else [])
    done = sum(store.done(r) for r in known)
    log(f"{plan.describe()}; {done} already done in {out}")
    progress = tqdm(
        total=plan.count(), initial=done, disable=not accelerator.is_local_main_process, unit="run"
    )

    def ensure(run: Run, score_tests: bool) -> None:
        if store.done(run):
            return
        progress.set_description(run.name)
        record = train_run(run, cfg, data, accelerator, context, score_tests)
        if accelerator.is_main_process:
            store.save(run, record)
        accelerator.wait_for_everyone()
        progress.update(1)

    with progress, quiet_weight_loading():
        for run in plan.sweep_runs():
            ensure(run, score_tests=False)
        final = plan.final_runs(plan.choose(store))
        if not swept:
            progress.update(sum(store.done(r) for r in final))
        for run in final:
            ensure(run, score_tests=True)
    if not accelerator.is_main_process:
        return None
    runs = [store.load(r) for r in plan.sweep_runs() + final]
    return write_report(
        out, plan.methods, plan.reference, runs, test_items(data), list(data.tests), n_bootstrap
    )
