"""PEFT's own generic tuner tests (its ``tests/test_custom_models.py``) run against MASM.

The upstream module comes from the sdist of the installed peft version (see
``peft_upstream_loader``); its test classes are re-parametrised over the MASM cases in
``peft_upstream_cases``. Every upstream test of these classes that does not run is in ``EXCLUDED``
(generic, but not applicable, with the reason) or in ``LEFT_OUT`` (computed: it exercises only
other PEFT methods). If the sdist cannot be fetched, ``test_peft_upstream_tests_available`` fails
and says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

import peft_masm  # noqa: F401  (registers PeftType.MASM before upstream's modules import peft)
from peft_masm import MASMConfig

import peft_upstream_cases as cases  # isort: skip
from peft_upstream_loader import UpstreamTestsUnavailable, import_upstream, remap_test_class  # isort: skip

# Generic upstream tests that do not apply to MASM, with the reason. Keys: class name -> test -> reason.
EXCLUDED: dict[str, dict[str, str]] = {
    "TestDefaultTargetModules": {
        "test_default_target_modules_list_of_str": (
            "monkeypatches LoRA's and DeLoRA's own model_type -> target table; MASM's table is "
            "MASMModel.target_module_mapping, exercised by the 'TinyViT 1 MASM' case (target_modules=None)"
        ),
        "test_default_target_modules_str": "as test_default_target_modules_list_of_str",
        "test_default_target_modules_not_set_raises": (
            "expects PEFT's generic 'Please specify `target_modules`'; MASM raises its own error naming the model "
            "types it knows, by design (issue 10): tests/tuner/test_config_and_registration.py::"
            "test_get_peft_model_on_an_unknown_model_type_gives_masm_s_error"
        ),
        "test_default_target_modules_not_set_model_type_set_raises": "as test_default_target_modules_not_set_raises",
    },
}

# Single parameter combinations that do not apply to MASM (deselected by this directory's conftest):
# (upstream class, test) -> (predicate on the test's parameters, reason).
UPSTREAM_EXCLUDED_CASES: dict[tuple[str, str], tuple[Callable[[dict[str, Any]], bool], str]] = {
    ("TestPeftCustomModel", "test_adapter_dtype_autocast"): (
        lambda params: not params["autocast_adapter_dtype"] and params["dtype"] != torch.float32,
        "autocast_adapter_dtype=False expects the adapter in the fp16/bf16 base dtype; MASM keeps its factors "
        "in float32 by design (minor singular directions do not survive bf16). The float32 and "
        "autocast_adapter_dtype=True combinations run.",
    ),
}

# Upstream tests failing because of MASM tuner bugs not fixed yet: marked xfail(strict=True) by this
# directory's conftest. Remove an entry once the tuner is fixed (the test then XPASSes, failing the run).
UPSTREAM_KNOWN_FAILURES: dict[tuple[str, str], tuple[Callable[[dict[str, Any]], bool], str]] = {}

# Upstream tests whose plain-SGD learning rate MASM's default parametrisation cannot take, and the rate they run at
# instead (this directory's conftest applies it), as upstream lowers it for DoRA, OSF or AdaLoRA.
UPSTREAM_SGD_LR: dict[tuple[str, str], tuple[Callable[[dict[str, Any]], bool], float, str]] = {
    ("TestPeftCustomModel", "test_parameters_after_loading_model"): (
        lambda params: True,
        1e-4,
        "3 plain-SGD steps at lr 0.5 on inputs up to 90 with loss = sum of outputs. The default scaled "
        "parametrisation s = s0 + subspace_alpha * rho * masm_s makes SGD's step on each singular value "
        "lr * (subspace_alpha * rho)**2 * dL/ds, 3e3-7e3 * lr on upstream's MLP (alpha 100, rho 0.56-0.82; Adam, "
        "which MASM is tuned for, moves it by alpha * rho * lr instead), so U diag(s) V^T grows ~1e4-fold in one "
        "step and the next forward overflows float32: NaN factors in 'Vanilla MLP 4' and '5' at 0.5 and 0.1 "
        "when nothing applies the fit bound between steps. No division or zero norm is involved, and LoRA's outputs are NaN after the same "
        "3 steps at 0.5 too (only its parameters stay finite). Every case keeps finite factors at 1e-3 (outputs up "
        "to 2e37, near float32's limit); 1e-4 (upstream's AdaLoRA rate) keeps them below 1e11.",
    ),
}

# These tests build two differently initialised random DeepMLPs and load the adapter trained on the first
# onto the second. MASM refuses that by design (the base-weight fingerprint check), so they run with
# check_base_model=False; everything they check (requires_grad after loading) is unaffected.
_MASM_OTHER_BASE = [partial(MASMConfig, check_base_model=False)]

# Upstream tests whose parametrisation is an inline list of other methods' configs, but whose check is
# generic: the MASM values replacing that list. Keys: class name -> test -> {argnames: values}.
INLINE: dict[str, dict[str, dict[str, list]]] = {
    "TestPeftCustomModel": {
        "test_multiple_adapters_mixed_modules_to_save": {"config_cls": [MASMConfig]},
        "test_multiple_adapters_mixed_modules_to_save_order_switched": {"config_cls": [MASMConfig]},
        "test_adapter_name_makes_no_difference": {
            "config0": [MASMConfig(target_modules=["lin0"], init_weights=False, **cases.K2)]
        },
    },
    "TestRequiresGrad": {
        "test_loading_model_requires_grad_set_correctly": {"config_cls": _MASM_OTHER_BASE},
        "test_loading_model_with_modules_to_save_requires_grad_set_correctly": {
            "config_cls": _MASM_OTHER_BASE
        },
    },
    "TestDefaultTargetModules": {
        "test_default_target_modules_not_set_raises": {"config_cls": [MASMConfig]},
        "test_default_target_modules_not_set_model_type_set_raises": {"config_cls": [MASMConfig]},
    },
}

# Upstream classes that hold generic MASM-relevant tests (the others test LoRA-only features).
CLASSES = (
    "TestPeftCustomModel",
    "TestMultipleActiveAdapters",
    "TestRequiresGrad",
    "TestMixedAdapterBatches",
    "TestDefaultTargetModules",
    "TestPeftFsdpStateDict",
)

# Filled below: class name -> test -> why it does not run (EXCLUDED plus tests of other methods only).
LEFT_OUT: dict[str, dict[str, str]] = {}


def _build() -> dict[str, type]:
    upstream = import_upstream(["test_custom_models"])["test_custom_models"]
    cases.MASMModels.upstream = upstream.MockTransformerWrapper
    case_lists = {
        id(upstream.TEST_CASES): cases.TEST_CASES,
        id(upstream.ALL_PEFT_CONFIG_CLASSES): cases.ALL_PEFT_CONFIG_CLASSES,
        id(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): cases.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
        id(upstream.MIXED_ADAPTER_TEST_CASES): cases.MIXED_ADAPTER_TEST_CASES,
    }
    built = {}
    for name in CLASSES:
        base = getattr(upstream, name)
        cls, LEFT_OUT[name] = remap_test_class(
            base,
            f"{name}MASM",
            case_lists=case_lists,
            inline=INLINE.get(name),
            excluded=EXCLUDED.get(name),
            attributes={"transformers_class": cases.MASMModels}
            if hasattr(base, "transformers_class")
            else {},
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

    def test_upstream_generic_tests_are_collected() -> None:
        """Guards against a silent no-op: upstream reshaping its case lists would leave nothing to run."""
        counts = {
            name: sum(a.startswith("test_") and callable(v) for a, v in vars(cls).items())
            for name, cls in _BUILT.items()
        }
        assert counts.get("TestPeftCustomModelMASM", 0) >= 40, counts
        assert counts.get("TestMultipleActiveAdaptersMASM", 0) >= 4, counts
        for name, reasons in EXCLUDED.items():
            assert set(reasons) <= set(LEFT_OUT[name]), (name, reasons)
