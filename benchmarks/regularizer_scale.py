"""How large are MASM's regularisers, and how hard do they pull, next to the task loss?

Trains the cross-forgery benchmark's full MASM (``masm_swept``: K=4 x k=2, both regularisers at one weight,
dynamic layer mask, fit-bound projection) as ``recipes/compare.py`` trains it on one fold of
``recipes/configs/cross_forgery.yaml`` (its balanced batches, head learning rate and run length), and at a few
steps measures on the step's own batch, before the update:

  * each term's value (unweighted, averaged over layers, as ``regularization_loss`` returns it) and its spread
    over layers (min / median / max of the per-layer value);
  * the gradient norm, over the adapter's trainable factors, of the task loss and of each *weighted* term,
    and their ratio (term gradient / task gradient);
  * how far the subspaces have moved, in units of their layer's scale rho (median and max over subspaces).

The terms start at exactly 0 with their gradient (the adapter starts at their minimum), so step 0 reads 0 by
design; the steps after it show how they grow. One JSON per backbone under ``benchmarks/results/regularizer_scale/``.

  python benchmarks/regularizer_scale.py [--backbone dinov2-s14|clip-vit-b16] [--weight 0.1] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from cross_forgery import fold_setup

from peft_masm.recipe.step import classification_loss, prepare_training
from peft_masm.tuner import stacked

RESULTS = Path(__file__).resolve().parent / "results" / "regularizer_scale"


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _per_layer_terms(tuner: Any) -> dict[str, list[float]]:
    """Each layer's unweighted terms, from the stacks the model's own ``regularization_loss`` averages."""
    adapter = tuner.active_adapters[0]
    layers = [layer for _, layer in tuner.masm_layers(adapter)]
    values: dict[str, list[float]] = {"orthogonality": [], "spectral": []}
    with torch.no_grad():
        for group in stacked.same_shape_groups(layers, adapter):
            for key, terms in stacked.regularization_terms(group, adapter).items():
                values[key] += terms.tolist()
    return values


def measure(model: Any, batch: dict[str, torch.Tensor], weight: float) -> dict[str, Any]:
    """Term values, per-layer spread, gradient norms and subspace movement at the current weights."""
    tuner = model.base_model
    params = [p for n, p in model.named_parameters() if p.requires_grad and "masm_" in n]
    task = classification_loss(model, batch, None)
    terms = tuner.regularization_loss(compute_all=True)
    grads = {}
    for name, value in (
        ("task", task),
        ("orthogonality", weight * terms["orthogonality"]),
        ("spectral", weight * terms["spectral"]),
    ):
        parts = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads[name] = float(
            torch.sqrt(sum((g.square().sum() for g in parts if g is not None), torch.zeros(())))
        )
    per_layer = _per_layer_terms(tuner)
    movement = [m for moves in tuner.subspace_movement().values() for m in moves]
    return {
        "task_loss": float(task.detach()),
        "orthogonality": float(terms["orthogonality"].detach()),
        "spectral": float(terms["spectral"].detach()),
        "orthogonality_per_layer": _spread(per_layer["orthogonality"]),
        "spectral_per_layer": _spread(per_layer["spectral"]),
        "grad_norm": grads,
        "grad_ratio": {
            name: (grads[name] / grads["task"] if grads["task"] > 0 else float("nan"))
            for name in ("orthogonality", "spectral")
        },
        "movement_rho": {"median": statistics.median(movement), "max": max(movement)},
    }


def run(backbone: str, weight: float, lr: float, group: str, seed: int, checkpoints: set[int]) -> dict:
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*newly initialized.*")
    torch.set_num_threads(2)
    overrides = ["--backbone", backbone, "--seed", str(seed), "--learning_rate", str(lr)]
    cfg, data, model = fold_setup(group, "masm_swept", overrides, reg_weight=weight)
    step, loader = prepare_training(cfg, Accelerator(cpu=True), model, data)
    steps = len(loader)
    records = []
    for index, batch in enumerate(loader):
        if index in checkpoints or index == steps - 1:
            record = {"step": index, **measure(model, batch, weight)}
            records.append(record)
            print(
                f"step {index:>3}: task {record['task_loss']:.3f}  orth {record['orthogonality']:.3g} "
                f"(grad x{record['grad_ratio']['orthogonality']:.3g})  spectral {record['spectral']:.3g} "
                f"(grad x{record['grad_ratio']['spectral']:.3g})  movement {record['movement_rho']['median']:.3g} rho",
                flush=True,
            )
        step(batch)
    return {
        "backbone": backbone,
        "fold": group,
        "seed": seed,
        "lr": lr,
        "weight": weight,
        "steps": steps,
        "layers": len(list(model.base_model.masm_layers())),
        "records": records,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", default="dinov2-s14", help="packaged backbone: dinov2-s14 or clip-vit-b16"
    )
    parser.add_argument(
        "--weight", type=float, default=0.1, help="both regulariser weights (the benchmark's choice)"
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="adapter learning rate (the benchmark's choice)"
    )
    parser.add_argument("--fold", default="blending", help="the held-out mechanism group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at", default="0,1,5,15", help="steps to measure at, besides the last")
    args = parser.parse_args(argv)
    result = run(
        args.backbone, args.weight, args.lr, args.fold, args.seed, {int(s) for s in args.at.split(",")}
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.backbone}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
