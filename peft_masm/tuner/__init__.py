"""The MASM PEFT method alone: config, layer, model, layer mask, regularisers, decomposition.

This subpackage imports only torch, numpy/scipy and peft with its own dependencies (never the detector, data,
hub, recipe or CLI of ``peft_masm``: tests/unit/test_package_structure.py checks it), so it could live in
``peft/tuners/masm/`` nearly unchanged. Importing it
registers the ``masm`` method with PEFT, as PEFT's own tuners do in their ``__init__``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import (
    DEFAULT_ATTENTION_TARGETS,
    DEFAULT_MLP_TARGETS,
    MASMConfig,
    default_target_modules,
    register_save_hook,
)
from .files import AdapterWeightsNotFoundError, IncompleteAdapterFileError
from .layer import BaseModelMismatchError, Linear, MASMLayer
from .mask import LayerMaskController
from .model import MASMModel
from .registration import NAME, PREFIX, masm_peft_type

__all__ = [
    "DEFAULT_ATTENTION_TARGETS",
    "DEFAULT_MLP_TARGETS",
    "BaseModelMismatchError",
    "AdapterWeightsNotFoundError",
    "IncompleteAdapterFileError",
    "LayerMaskController",
    "Linear",
    "MASMConfig",
    "MASMLayer",
    "MASMModel",
    "default_target_modules",
    "register",
    "register_save_hook",
]


def register() -> None:
    """Register the MASM config and tuner with PEFT (no-op when already registered)."""
    peft_type = masm_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is MASMConfig:
        return
    # A reloaded module: drop the stale classes first (register_peft_method refuses duplicates).
    for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
        table.pop(peft_type, None)
    register_peft_method(name=NAME, config_cls=MASMConfig, model_cls=MASMModel, prefix=PREFIX)


register()
