"""``PeftType.MASM``: a real member of PEFT's closed ``PeftType`` enum, created in place.

``register_peft_method`` refuses names that are not members, so the member must exist before the
tuner registers itself (``peft_masm.tuner.__init__``). Idempotent (re-import, module reload).
"""

from __future__ import annotations

from typing import cast

from peft.utils import PeftType

NAME = "masm"
PREFIX = "masm_"


def masm_peft_type() -> PeftType:
    """Return ``PeftType.MASM``, adding the member to PEFT's enum the first time."""
    existing = PeftType._value2member_map_.get("MASM")
    if existing is not None:
        return cast(PeftType, existing)
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
