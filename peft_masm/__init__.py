"""MASM for PEFT: Multi-Artifact Subspaces and selective layer Masks for deepfake detection.

Importing this package registers the ``masm`` method with PEFT (``peft_masm.tuner`` does it), so
``get_peft_model(model, MASMConfig(...))`` and ``PeftModel.from_pretrained(base, "org/adapter")`` work as
for PEFT's own methods. The tuner is ``peft_masm.tuner``; the application (training step, detector,
data, backbones, metrics, Hub, CLI) sits above it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .tuner import (
    AdapterWeightsNotFoundError,
    BaseModelMismatchError,
    IncompleteAdapterFileError,
    LayerMaskController,
    MASMConfig,
    MASMLayer,
    MASMModel,
    default_target_modules,
    register_save_hook,
)
from .tuner.version import __version__ as __version__

__all__ = [
    "AdapterWeightsNotFoundError",
    "BaseModelMismatchError",
    "IncompleteAdapterFileError",
    "LayerMaskController",
    "MASMConfig",
    "MASMLayer",
    "MASMModel",
    "MASMTrainer",
    "MASMTrainerCallback",
    "NonFiniteLossError",
    "TrainingStep",
    "build_detector",
    "calibrate_layer_mask",
    "default_target_modules",
    "load_detector",
    "plot_mask_history",
    "presets",
    "push_detector_to_hub",
    "save_detector",
]

# Imported on first use: they pull in transformers.Trainer, matplotlib or the Hub client (slow to import).
_LAZY = {
    "MASMTrainer": "trainer",
    "MASMTrainerCallback": "trainer",
    "NonFiniteLossError": "training",
    "TrainingStep": "training",
    "calibrate_layer_mask": "training",
    "build_detector": "detector",
    "load_detector": "detector",
    "save_detector": "detector",
    "push_detector_to_hub": "detector",
    "plot_mask_history": "visualization",
}


def _write_model_card(config: MASMConfig, save_directory: str) -> None:
    # Imported here: the Hub client is slow to import and only needed when an adapter is saved.
    from .hub import write_card_on_save

    write_card_on_save(config, save_directory)


register_save_hook(_write_model_card)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "presets":
        return importlib.import_module(".presets", __name__)
    raise AttributeError(f"module 'peft_masm' has no attribute {name!r}")
