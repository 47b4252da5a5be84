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
)
from .tuner import (
    register_save_hook as register_save_hook,  # deprecated: the tuner writes its own card (tuner/card.py)
)
from .tuner.version import __version__ as __version__

__all__ = [
    "AdapterWeightsNotFoundError",
    "BaseModelMismatchError",
    "DetectorConfig",
    "IncompleteAdapterFileError",
    "LayerMaskController",
    "MASMConfig",
    "MASMDetector",
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
    "DetectorConfig": "detector",
    "MASMDetector": "detector",
    "build_detector": "detector",
    "load_detector": "detector",
    "save_detector": "detector",
    "push_detector_to_hub": "detector",
    "plot_mask_history": "visualization",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "presets":
        return importlib.import_module(".presets", __name__)
    raise AttributeError(f"module 'peft_masm' has no attribute {name!r}")
