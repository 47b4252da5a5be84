"""MASM for PEFT: Multi-Artifact Subspaces and selective layer Masks for deepfake detection.

Importing this package registers the ``masm`` method with PEFT, so ``get_peft_model(model,
MASMConfig(...))`` and ``PeftModel.from_pretrained(base, "org/adapter")`` work as for PEFT's own methods.
"""

from .config import MASMConfig, default_target_modules
from .layer import BaseModelMismatchError, MASMLayer
from .model import MASMModel
from .registration import register as _register

_register()

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "MASMConfig",
    "MASMLayer",
    "MASMModel",
    "default_target_modules",
]
