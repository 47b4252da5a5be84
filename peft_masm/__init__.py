"""MASM for PEFT: Multi-Artifact Subspaces and selective layer Masks for deepfake detection.

Importing this package registers the ``masm`` method with PEFT, so ``get_peft_model(model,
MASMConfig(...))`` and ``PeftModel.from_pretrained(base, "org/adapter")`` work as for PEFT's own methods.
"""

from .config import MASMConfig, default_target_modules
from .layer import BaseModelMismatchError, MASMLayer
from .masking import LayerMaskController, calibrate_layer_mask, plot_mask_history
from .model import MASMModel
from .registration import register as _register

_register()

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "LayerMaskController",
    "MASMConfig",
    "MASMLayer",
    "MASMModel",
    "MASMTrainer",
    "MASMTrainerCallback",
    "build_detector",
    "calibrate_layer_mask",
    "default_target_modules",
    "load_detector",
    "plot_mask_history",
]

_LAZY = {
    # Imported on first use: they pull in transformers.Trainer / the Hub client (slow to import).
    "MASMTrainer": "training",
    "MASMTrainerCallback": "training",
    "build_detector": "detector",
    "load_detector": "detector",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'peft_masm' has no attribute {name!r}")
