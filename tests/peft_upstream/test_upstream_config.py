"""PEFT's own config tests (its ``tests/test_config.py``) run against ``MASMConfig``.

The upstream module comes from the sdist of the installed peft version (see
``peft_upstream_loader``); ``TestPeftConfig`` is re-parametrised so that its per-config-class checks
(save/load round trip, JSON, copy, pickle, task types, version stamping, ...) run for MASMConfig.
``test_from_peft_type`` runs as it is: it builds every registered PeftType's config, MASM included.
"""

from __future__ import annotations

import pytest

import peft_masm  # noqa: F401  (registers PeftType.MASM before upstream's modules import peft)
from peft_masm import MASMConfig

import peft_upstream_cases as cases  # isort: skip
from peft_upstream_loader import UpstreamTestsUnavailable, import_upstream, remap_test_class  # isort: skip

_HUB = "downloads a config from the Hugging Face Hub (peft-internal-testing/tiny-opt-lora-revision); offline here"

# Generic upstream tests that do not apply to MASM, with the reason. Keys: class name -> test -> reason.
EXCLUDED: dict[str, dict[str, str]] = {
    "TestPeftConfig": {
        "test_from_pretrained": _HUB,
        "test_from_pretrained_cache_dir": _HUB,
        "test_from_pretrained_cache_dir_remote": "downloads ybelkada/test-st-lora from the Hub; offline here",
        "test_save_pretrained_with_runtime_config": _HUB,
    },
}

# Inline parametrisations over other methods' configs whose check is generic -> MASM values.
INLINE: dict[str, dict[str, dict[str, list]]] = {
    "TestPeftConfig": {"test_save_pretrained_with_target_modules": {"config_class": [MASMConfig]}},
}

# Unparametrised upstream tests that are generic and run as they are.
KEEP: dict[str, tuple[str, ...]] = {"TestPeftConfig": ("test_from_peft_type",)}

CLASSES = ("TestPeftConfig",)

# Filled below: class name -> test -> why it does not run (EXCLUDED plus tests of other methods only).
LEFT_OUT: dict[str, dict[str, str]] = {}


def _build() -> dict[str, type]:
    upstream = import_upstream(["test_config"])["test_config"]
    case_lists = {
        id(upstream.ALL_CONFIG_CLASSES): cases.ALL_CONFIG_CLASSES,
        id(upstream.LAYER_INDEXING_CONFIG_CLASSES): cases.ALL_CONFIG_CLASSES,
    }
    built = {}
    for name in CLASSES:
        cls, LEFT_OUT[name] = remap_test_class(
            getattr(upstream, name),
            f"{name}MASM",
            case_lists=case_lists,
            inline=INLINE.get(name),
            keep=KEEP.get(name, ()),
            excluded=EXCLUDED.get(name),
        )
        if cls is not None:
            built[cls.__name__] = cls
    return built


try:
    _BUILT = _build()
except (UpstreamTestsUnavailable, AttributeError) as exc:
    _UNAVAILABLE = f"{type(exc).__name__}: {exc}"

    def test_peft_upstream_tests_available() -> None:
        pytest.fail(_UNAVAILABLE, pytrace=False)

else:
    globals().update(_BUILT)

    def test_upstream_config_tests_are_collected() -> None:
        """Guards against a silent no-op: upstream reshaping ALL_CONFIG_CLASSES would leave nothing to run."""
        cls = _BUILT.get("TestPeftConfigMASM")
        assert cls is not None
        assert sum(a.startswith("test_") and callable(v) for a, v in vars(cls).items()) >= 15
