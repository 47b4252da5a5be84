"""The tuner's own model card: what ``model.save_pretrained(folder)`` of a MASM adapter writes in place of PEFT's
blank README.md.

It is written by ``MASMConfig.save_pretrained`` (the tuner's own save path), after the weights and the config, and
only where README.md is missing or still PEFT's blank template: a card written by the user, or the detector's
fuller card (``peft_masm.MASMDetector``, which writes its own), is kept. Nothing here calls the application.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Markers of the blank card PEFT writes on every save_pretrained (huggingface_hub's default template).
BLANK_CARD_MARKERS = (
    "[More Information Needed]",
    "<!-- Provide a quick summary of what the model is/does. -->",
)
# Present in every card of this package (the loading code imports it): such a card is ours to replace.
CARD_MARKER = "import peft_masm"


def is_replaceable_card(readme: Path) -> bool:
    """True when ``readme`` is missing, PEFT's blank template, or a card of this package (not one the user wrote)."""
    if not readme.is_file():
        return True
    text = readme.read_text(encoding="utf-8", errors="replace")
    return CARD_MARKER in text or any(marker in text for marker in BLANK_CARD_MARKERS)


def _load_code(base_model: str | None, base_class: str) -> str:
    base = json.dumps(base_model or "path/to/the/base/model")
    return (
        "import peft_masm  # noqa: F401  registers the MASM tuner type with PEFT\n"
        "from peft import PeftModel\n"
        f"from transformers import {base_class}\n"
        "\n"
        f"base = {base_class}.from_pretrained({base})\n"
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")\n'
        "model.eval()\n"
    )


def render_adapter_card(config: Any, metadata: dict[str, Any] | None = None) -> str:
    """The card of a MASM adapter saved on its own: metadata, what MASM is, how to load it. ``metadata``: what
    PEFT's blank card already recorded (its ``base_model`` among it), kept, with the ``masm`` tag added."""
    from huggingface_hub import ModelCardData

    base_model = getattr(config, "base_model_name_or_path", None) or None
    base_class = (getattr(config, "auto_mapping", None) or {}).get("base_model_class") or "AutoModel"
    hub_id = base_model if base_model and "/" in base_model and not Path(base_model).exists() else None
    fields: dict[str, Any] = {"library_name": "peft", "base_model": hub_id, **(metadata or {})}
    fields["tags"] = list(dict.fromkeys([*(fields.get("tags") or []), "peft", "masm"]))
    data = ModelCardData(**fields)
    described = f"`{base_model}`" if base_model else "a base model whose name was not recorded"
    return (
        f"---\n{data.to_yaml()}\n---\n\n"
        "# MASM adapter\n\n"
        "A **MASM** adapter (Multi-Artifact Subspaces and selective layer Masks) saved with "
        f"[`peft_masm`](https://pypi.org/project/peft_masm/) for {described}. The folder holds only the adapter "
        "(`adapter_config.json`, `adapter_model.safetensors`).\n\n"
        "## How to load it\n\n"
        "`import peft_masm` is **required** before `PeftModel.from_pretrained`: it registers the `MASM` tuner "
        "type with PEFT.\n\n"
        f"```python\n{_load_code(base_model, base_class)}```\n"
    )


def write_adapter_card(config: Any, save_directory: str | os.PathLike) -> Path | None:
    """After a MASM adapter's ``save_pretrained``: replace PEFT's blank card with :func:`render_adapter_card`.

    Nothing is written for a config saved on its own (no weights beside it), nor over a card that is not PEFT's
    blank template or ours. Returns the card written, or None.
    """
    out = Path(save_directory)
    if not (out / "adapter_model.safetensors").is_file() or not (out / "adapter_config.json").is_file():
        return None
    readme = out / "README.md"
    from huggingface_hub import ModelCard

    metadata: dict[str, Any] = {}
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if not any(marker in text for marker in BLANK_CARD_MARKERS):
            return None  # the user's card, or a fuller card of this package: kept
        metadata = ModelCard(text).data.to_dict()
    ModelCard(render_adapter_card(config, metadata)).save(readme)
    return readme
