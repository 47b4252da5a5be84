"""Named MASM configurations, defined once: ``effort`` and ``paper``.

``peft_masm.presets.masm_config("effort", modules_to_save=["classifier"])`` builds a :class:`MASMConfig`;
recipes say ``masm: {preset: effort}`` and the benchmarks and tests use the same names.

- ``effort``: Effort (Yan et al., ICML 2025) as a MASM configuration: one rank-1 artifact subspace per
  target (r = d - 1), no layer mask, no regularisers. Our layer then equals Effort's formula exactly.
- ``paper``: the setting of ``recipes/configs/paper.yaml``: K=4 subspaces of rank 2, interleaved, and the dynamic
  layer mask, which the package defaults leave off (docs/method.md says why).

Both are listed, field by field, in docs/configuration.md (generated from ``PRESETS``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .tuner import MASMConfig

__all__ = ["PRESETS", "masm_config", "preset_fields"]

PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType(
    {
        "effort": MappingProxyType(
            {
                "num_subspaces": 1,
                "subspace_rank": 1,
                "layer_mask": "none",
                "orthogonality_weight": 0.0,
                "spectral_weight": 0.0,
                "fit_constraint": "none",
                "subspace_alpha": None,
            }
        ),
        "paper": MappingProxyType(
            {
                "num_subspaces": 4,
                "subspace_rank": 2,
                "partition": "interleaved",
                "layer_mask": "dynamic",
                "mask_keep_ratio": 0.75,
                "mask_interval": 20,
                "mask_warmup": 20,
            }
        ),
    }
)


def preset_fields(name: str) -> dict[str, Any]:
    """The :class:`MASMConfig` fields of preset ``name`` (a new dict)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MASM preset {name!r}; known presets: {sorted(PRESETS)}.")
    return dict(PRESETS[name])


def masm_config(name: str, **overrides: Any) -> MASMConfig:
    """A :class:`MASMConfig` of preset ``name``; ``overrides`` (any MASMConfig field) win over the preset."""
    return MASMConfig(**{**preset_fields(name), **overrides})
