"""Data for deepfake detection: loaders, faces, synthetic forgeries and a packaged real-face corpus.

Submodules are imported on first attribute access, so ``import peft_masm.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_folder": "loaders",
    "load_deepfakebench": "loaders",
    "load_manifest": "loaders",
    "load_videos": "loaders",
    "with_image_processor": "processing",
    "collate": "processing",
    "DataError": "io",
    "LoadReport": "io",
    "read_image": "io",
    "probe_image": "io",
    "UnusableFileError": "io",
    "MIN_IMAGE_SIZE": "io",
    "read_video_frames": "video",
    "evenly_spaced_indices": "video",
    "FaceCropper": "faces",
    "FAMILIES": "forgeries",
    "FAMILY_GROUPS": "forgeries",
    "families_by_group": "forgeries",
    "build_real_face_corpus": "corpus",
    "build_forgery_benchmark": "corpus",
    "split_by_identity": "corpus",
    "split_by_person": "corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
