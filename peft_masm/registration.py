"""Make MASM a PEFT method: a real ``PeftType.MASM`` member and PEFT's lookup tables.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` refuses names that are not
members, so the member is created in place. Both steps are idempotent (re-import, module reload).
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "masm"
PREFIX = "masm_"


def masm_peft_type() -> PeftType:
    """Return ``PeftType.MASM``, adding the member to PEFT's enum the first time."""
    existing = PeftType._value2member_map_.get("MASM")
    if existing is not None:
        return existing
    member = str.__new__(PeftType, "MASM")
    member._name_ = "MASM"
    member._value_ = "MASM"
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append("MASM")
    PeftType._member_map_["MASM"] = member
    PeftType._value2member_map_["MASM"] = member
    # A class attribute too: on Python >= 3.12 enum members are looked up there.
    type.__setattr__(PeftType, "MASM", member)
    return member


def register() -> None:
    """Register the MASM config and tuner with PEFT (no-op when already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import MASMConfig
    from .model import MASMModel

    peft_type = masm_peft_type()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is MASMConfig:
        return
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:  # a reloaded module: replace the stale classes
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

        for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            table.pop(peft_type, None)
    register_peft_method(name=NAME, config_cls=MASMConfig, model_cls=MASMModel, prefix=PREFIX)
