"""Checks of a saved adapter's files that turn low-level loading errors into messages that say what to do."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from huggingface_hub import try_to_load_from_cache

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older format, which it still loads
CONFIG_NAME = "adapter_config.json"


class IncompleteAdapterFileError(ValueError):
    """An adapter weight file is shorter than its own header says (an interrupted save or download)."""


class AdapterWeightsNotFoundError(FileNotFoundError):
    """An adapter is being loaded from a local folder that holds ``adapter_config.json`` but no weight file."""


def missing_weights_message(folder: str | os.PathLike) -> str | None:
    """The one-line error for a local adapter folder that holds ``adapter_config.json`` but no weight file (PEFT
    would take the folder for a Hub id and fail on that instead), listing what it holds; ``None`` for any other
    folder or name."""
    folder = os.path.normpath(os.fspath(folder))
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)) or any(
        os.path.isfile(os.path.join(folder, name)) for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
    ):
        return None
    names = sorted(os.listdir(folder))
    held = ", ".join(names[:8]) + (f", ... ({len(names)} files)" if len(names) > 8 else "")
    return (
        f"The adapter folder {folder} has no {WEIGHTS_NAME} (it holds: {held}): the adapter's weights were not saved "
        f"there or not copied with its config; copy {WEIGHTS_NAME} into that folder, or save the adapter again "
        "(peft_model.save_pretrained)."
    )


def check_safetensors_complete(path: str | os.PathLike) -> None:
    """Raise :class:`IncompleteAdapterFileError` if ``path`` is truncated or its header is unreadable.

    Reads only the header (8-byte length, then JSON) and compares the byte ranges it lists with the file size.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    fix = "the save or download was interrupted; save the adapter again or delete it and download it again."
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise IncompleteAdapterFileError(f"{path} is incomplete ({size} bytes, no header): {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise IncompleteAdapterFileError(
                f"{path} is incomplete ({size} bytes; its header alone needs {8 + header_len}): {fix}"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IncompleteAdapterFileError(
                f"{path} is not a readable safetensors file (bad header): {fix}"
            ) from None
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise IncompleteAdapterFileError(f"{path} is incomplete ({size} of {needed} bytes): {fix}")


def check_adapter_weights_complete(
    folder: str, repo_id: str | None = None, subfolder: str | None = None, **hub_kwargs: Any
) -> None:
    """Check the adapter weights in a local ``folder``, or in the Hub cache for ``repo_id`` when already downloaded.

    Files not on disk yet are left to the download, which checks them itself.
    """
    local = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(local):
        check_safetensors_complete(local)
        return
    if repo_id is None or os.path.isdir(repo_id):
        return
    filename = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
    try:
        cached = try_to_load_from_cache(
            repo_id, filename, cache_dir=hub_kwargs.get("cache_dir"), revision=hub_kwargs.get("revision")
        )
    except ValueError:  # not a valid repo id: PEFT reports that itself
        return
    if isinstance(cached, str):
        check_safetensors_complete(cached)
