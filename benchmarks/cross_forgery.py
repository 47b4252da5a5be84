"""The synthetic cross-forgery benchmark through ``recipes/compare.py``: leave one mechanism group out, once per group.

Each fold is one comparison of ``recipes/configs/cross_forgery.yaml`` with one group's forgery families held out
(trained on every other group's families), in ``OUT/<group>/``. The sweep folds (blending and transfer) choose each
method's learning rate on their own validation split; every other fold reuses, per method, the rate with the best
mean validation AUC over the sweep folds' sweeps (validation only, as the benchmark's earlier engine chose them).
``report`` pools the folds: held-out AUC per fold and on average, in-domain AUC (the held-out people's faces with the
training families), and each method's paired difference to the reference over every fold's held-out test items
(``peft_masm.metrics.paired``: one bootstrap draw resamples the seeds once for every fold, and each fold's items).

    python benchmarks/cross_forgery.py run [--folds blending,transfer] [--seeds 5] [--methods ... --reference ...]
    python benchmarks/cross_forgery.py report [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_masm.data.forgeries import families_by_group
from peft_masm.metrics.paired import PairedScores, frame_auc, paired_difference
from peft_masm.recipe import methods as registry
from peft_masm.recipe.data import HELD_OUT_FAMILIES as HELD_OUT
from peft_masm.recipe.data import SEEN_FAMILIES as IN_DOMAIN

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "cross_forgery.yaml"
OUT = REPO / "benchmarks" / "results" / "compare" / "cross_forgery"
SWEEP_FOLDS = ("blending", "transfer")
# the published table's rows (MASM as it was swept there, first: the reference), the package default and FMSD
DEFAULT_METHODS = (
    "masm_swept_w10,masm,lora_r8,effort,osf,adamss_scheduled,ln_tuning,linear_probe,full_ft,fmsd"
)


def fold_families(group: str) -> tuple[list[str], list[str]]:
    """Training and held-out families of the fold that holds out mechanism group ``group``."""
    groups = families_by_group()
    if group not in groups:
        raise SystemExit(f"error: unknown mechanism group {group!r}; the groups: {', '.join(groups)}")
    return [f for g, fams in groups.items() if g != group for f in fams], list(groups[group])


def fold_config(group: str, *overrides: str) -> Any:
    """The recipe config of the fold that holds out ``group`` (``--key value`` ``overrides`` applied)."""
    from peft_masm.recipe.config import load_config

    train, test = fold_families(group)
    return load_config(
        CONFIG, ["--train_families", ",".join(train), "--test_families", ",".join(test), *overrides]
    )


def fold_setup(
    group: str, method: str, overrides: Sequence[str] = (), **context: Any
) -> tuple[Any, Any, Any]:
    """What a diagnostic of one fold needs: its config (``--key value`` ``overrides`` applied), its data (the
    recipe's ``build_data``) and ``method``'s detector as compare.py builds it, initialised from the config's seed
    (``context``: extra values for the method file, e.g. ``reg_weight``)."""
    import torch

    from peft_masm.detector import load_image_processor
    from peft_masm.recipe.compare import run_context
    from peft_masm.recipe.data import build_data

    cfg = fold_config(group, *overrides)
    data = build_data(cfg, load_image_processor(cfg.backbone, cfg.image_size))
    names = {**run_context(cfg, data), **context}  # loads the backbone: before the seed is set
    torch.manual_seed(cfg.seed)
    model, _ = registry.build_method_model(method, cfg.backbone, names, pooling=cfg.pooling)
    return cfg, data, model


def _runs(fold_dir: Path, method: str, stage: str, seeds: int | None = None) -> list[dict[str, Any]]:
    """The finished runs of ``method`` in ``stage`` of one fold, in seed order (the first ``seeds`` of them)."""
    paths = (fold_dir / "runs" / registry.method_name(method)).glob(f"{stage}-*.json")
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["seed"])[:seeds]


def chosen_rates(out: Path, methods: list[str]) -> dict[str, float]:
    """Per method, the rate of its grid with the best mean validation metric over the sweep folds' sweeps (a tie
    goes to the first rate of the grid); methods without a sweep keep their file's grid."""
    chosen = {}
    for method in methods:
        grid = registry.spec(method).get("learning_rates") or []
        if len(grid) < 2:
            continue
        by_rate = {float(lr): [] for lr in grid}  # type: dict[float, list[float]]
        for fold in SWEEP_FOLDS:
            for run in _runs(out / fold, method, "sweep"):
                by_rate[run["learning_rate"]].append(run["val_metric"])
        if any(len(v) != len(SWEEP_FOLDS) for v in by_rate.values()):
            raise SystemExit(
                f"error: {method}'s sweeps on {', '.join(SWEEP_FOLDS)} are not finished; run them first"
            )
        means = [np.mean(by_rate[float(lr)]) for lr in grid]
        chosen[method] = float(grid[int(np.argmax(means))])
    return chosen


def run(options: argparse.Namespace) -> None:
    """One comparison per fold (the sweep folds first), each resumable, through recipes/compare.py."""
    folds = options.folds.split(",") if options.folds else list(families_by_group())
    folds = [f for f in SWEEP_FOLDS if f in folds] + [f for f in folds if f not in SWEEP_FOLDS]
    methods = options.methods.split(",")
    for group in folds:
        train, test = fold_families(group)
        args = [sys.executable, str(REPO / "recipes" / "compare.py"), "--config", str(CONFIG),
                "--methods", options.methods, "--seeds", str(options.seeds), "--reference", options.reference,
                "--train_families", ",".join(train), "--test_families", ",".join(test),
                "--output_dir", str(options.out / group)]  # fmt: skip
        if options.backbone:
            args += ["--backbone", options.backbone]
        if group not in SWEEP_FOLDS:
            rates = chosen_rates(options.out, methods)
            if rates:
                args += ["--learning_rates", ",".join(f"{m}={lr:g}" for m, lr in rates.items())]
        print(f"fold {group}: held out {', '.join(test)}", flush=True)
        code = subprocess.run(args).returncode
        if code:  # compare.py has said why, in one line
            raise SystemExit(code)


def _scores(runs: list[dict[str, Any]], subset: str) -> np.ndarray:
    return np.array([r["test_scores"][subset] for r in runs])


def _aucs(runs: list[dict[str, Any]], labels: np.ndarray, subset: str) -> np.ndarray:
    """Per seed: the AUC of one fold's ``subset``."""
    return np.array([frame_auc(labels, s) for s in _scores(runs, subset)])


def pooled_row(folds: dict[str, Path], method: str, stage: str, versus: tuple[str, str] | None, seeds: int,
               n_bootstrap: int) -> dict[str, Any]:  # fmt: skip
    """One method's row over every fold, on the first ``seeds`` seeds of each: held-out and in-domain AUC (mean over
    seeds), their mean over folds, the seed spread of that mean, and the paired difference to ``versus`` (method,
    stage) pooled over the folds."""
    held_out, in_domain, paired, per_seed, rates, seconds = {}, {}, [], [], {}, []
    for group, fold_dir in folds.items():
        items = json.loads((fold_dir / "test_items.json").read_text())
        runs = _runs(fold_dir, method, stage, seeds)
        labels = np.asarray(items[HELD_OUT]["labels"])
        aucs = _aucs(runs, labels, HELD_OUT)
        held_out[group], rates[group] = float(aucs.mean()), runs[0]["learning_rate"]
        in_domain[group] = float(_aucs(runs, np.asarray(items[IN_DOMAIN]["labels"]), IN_DOMAIN).mean())
        per_seed.append(aucs)
        seconds += [r["seconds"] for r in runs]
        if versus is not None:
            other = _runs(fold_dir, *versus, seeds)
            paired.append(PairedScores(labels, _scores(runs, HELD_OUT), _scores(other, HELD_OUT),
                                       np.asarray(items[HELD_OUT]["video_ids"])))  # fmt: skip
    row = {
        "method": registry.method_name(method) + (" (other seeds)" if stage == "noise" else ""),
        "learning_rates": rates,
        "trainable_backbone": runs[0]["trainable"]["backbone"],
        "held_out": held_out,
        "held_out_mean": float(np.mean(list(held_out.values()))),
        "seed_sd": float(np.std(np.mean(per_seed, axis=0))),
        "in_domain_mean": float(np.mean(list(in_domain.values()))),
        "seconds_per_run": float(np.mean(seconds)),
    }
    if paired:
        row["vs_reference"] = list(vars(paired_difference(paired, n_bootstrap)).values())
    return row


def report(options: argparse.Namespace) -> dict[str, Any]:
    """Pool the finished folds under ``options.out`` into ``summary.json`` and ``table.md`` there, on the seeds
    every fold has."""
    folds = {
        g: options.out / g for g in families_by_group() if (options.out / g / "test_items.json").is_file()
    }
    if not folds:
        raise SystemExit(f"error: no finished fold under {options.out}; run `run` first")
    first = json.loads((next(iter(folds.values())) / "summary.json").read_text())
    ref = first["reference"]
    methods = [r["method"] for r in first["rows"] if not r.get("noise_floor")]
    seeds = min(len(_runs(d, ref, "test")) for d in folds.values())
    rows = [pooled_row(folds, m, "test", None if m == ref else (ref, "test"), seeds, options.n_bootstrap)
            for m in methods]  # fmt: skip
    rows.append(pooled_row(folds, ref, "noise", (ref, "test"), seeds, options.n_bootstrap))
    summary = {"reference": ref, "folds": list(folds), "seeds": seeds, "n_bootstrap": options.n_bootstrap,
               "rows": rows}  # fmt: skip
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (options.out / "table.md").write_text(table_markdown(summary))
    return summary


def table_markdown(summary: dict[str, Any]) -> str:
    folds, ref = summary["folds"], summary["reference"]
    lines = ["| method | backbone params trained | held-out mean AUC | seed sd | " + " | ".join(folds)
             + f" | in-domain AUC | vs {ref} (paired, 95 % CI) | s/run |", "|" + "---|" * (len(folds) + 7)]  # fmt: skip
    for row in summary["rows"]:
        vs = row.get("vs_reference")
        paired = f"{vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}]" if vs else "reference"
        cells = " | ".join(f"{row['held_out'][g]:.3f}" for g in folds)
        lines.append(f"| {row['method']} | {row['trainable_backbone']:,} | {row['held_out_mean']:.3f} | "
                     f"{row['seed_sd']:.3f} | {cells} | {row['in_domain_mean']:.3f} | {paired} | "
                     f"{row['seconds_per_run']:.0f} |")  # fmt: skip
    lines += ["", f"Held-out AUC per fold: the mean over the first {summary['seeds']} seeds of every fold. The last "
              f"row is {ref} trained again with other seeds (the noise floor), paired against {ref}. Learning "
              "rates per fold: summary.json; each fold's own table, on all its seeds: <fold>/table.md."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--reference", default=DEFAULT_METHODS.split(",")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", default=None, help="comma-separated mechanism groups (default: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--backbone", default=None, help="another backbone than the config's (e.g. clip-vit-b16)"
    )
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    options = parser.parse_args(argv)
    if options.command == "run":
        run(options)
    summary = report(options)
    print((options.out / "table.md").read_text() if summary else "")


if __name__ == "__main__":
    main()
