"""Pictures of a MASM run: the layer-mask decision heatmap."""

from __future__ import annotations

from pathlib import Path

import torch

from .training import find_masm_model


def plot_mask_history(peft_model: torch.nn.Module, path: str | Path) -> Path:
    """Draw the layer mask's decisions (units x decision steps; white = trains, black = masked) as a PNG.

    The title says how many units trained at the last decision.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    controller = find_masm_model(peft_model).layer_mask
    path = Path(path)
    names = [unit.name.removeprefix("base_model.model.") for unit in controller.units]
    if controller.history_masks:
        data = torch.tensor(controller.history_masks).T.numpy()
        steps = controller.history_steps
    else:
        data = torch.tensor([controller.current_keep()], dtype=torch.float32).T.numpy()
        steps = [0]
    training = int(data[:, -1].sum())
    height = max(3.0, 0.18 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(steps) + 4), height))
    ax.imshow(data, aspect="auto", cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90)
    ax.set_xlabel("optimizer step of the decision")
    ax.set_title(
        f"MASM layer mask ({controller.config.layer_mask}): {training}/{len(names)} units train at the last decision\n"
        "white = trains, black = masked",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
