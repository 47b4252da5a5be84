"""Do MASM's starting subspaces see any signal? For every adapted layer of the benchmark's detector, the energy of
its inputs along V0 (the minor right singular vectors the subspaces start from) and of its output gradients along
U0, each relative to a random subspace of the same size (1.0 = as much as a random direction, as LoRA's random A
sees; 0 = none). One batch of 64 training faces of the cross-forgery benchmark's blending fold
(``recipes/configs/cross_forgery.yaml``), DINOv2-S, the benchmark's MASM (``masm_swept_w10``).

Run: ``.venv/bin/python benchmarks/subspace_signal.py`` (about a minute).
"""

from __future__ import annotations

import numpy as np
import torch
from cross_forgery import fold_setup

from peft_masm.data import collate
from peft_masm.recipe.step import classification_loss
from peft_masm.tuner.layer import MASMLayer


def relative_energy(rows: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """(energy along ``basis`` per basis column, energy per dimension) of the rows of ``rows``."""
    rows = rows.detach().reshape(-1, rows.shape[-1])
    return float((rows @ basis).square().sum()) / basis.shape[1], float(rows.square().sum()) / rows.shape[1]


def main(group: str = "blending") -> None:
    torch.set_num_threads(1)
    cfg, data, model = fold_setup(group, "masm_swept_w10")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MASMLayer)}
    sums = {name: np.zeros(4) for name in layers}

    def hook(name: str, layer: MASMLayer):
        def forward(module, inputs, output):
            sums[name][:2] += relative_energy(inputs[0], layer.masm_V0["default"])

            def backward(grad: torch.Tensor) -> None:
                sums[name][2:] += relative_energy(grad, layer.masm_U0["default"])

            output.register_hook(backward)

        return forward

    for name, layer in layers.items():
        layer.register_forward_hook(hook(name, layer))
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:64]
    model.train()
    classification_loss(model, collate([data.train[int(i)] for i in pick]), None).backward()

    inputs = {name: s[0] / s[1] for name, s in sums.items()}
    grads = {name: s[2] / s[3] for name, s in sums.items()}
    print(f"{cfg.backbone}, {len(layers)} adapted layers, fold {group}, 64 training faces")
    for label, values in (("input energy along V0", inputs), ("output-gradient energy along U0", grads)):
        v = np.array(list(values.values()))
        print(f"{label} / random subspace: median {np.median(v):.3f}, range {v.min():.4f}..{v.max():.3f}")
    for kind in sorted({name.rsplit(".", 1)[-1] for name in layers}):
        names = [n for n in layers if n.endswith(kind)]
        print(
            f"  {kind}: inputs {np.median([inputs[n] for n in names]):.3f}, "
            f"gradients {np.median([grads[n] for n in names]):.3f}"
        )


if __name__ == "__main__":
    main()
