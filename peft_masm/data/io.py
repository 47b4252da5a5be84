"""Robust image decoding: any PIL-readable file or array -> RGB uint8, with errors that name the file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "MIN_IMAGE_SIZE",
    "DataError",
    "UnusableFileError",
    "LoadReport",
    "check_image_size",
    "probe_image",
    "read_image",
    "to_rgb_uint8",
    "check_on_error",
]

#: Smallest usable image side in pixels: below it there is no face to crop or score (training and masm-detect).
MIN_IMAGE_SIZE = 16


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


class UnusableFileError(DataError):
    """One listed file cannot be used (missing, unreadable, too small); skipping it is an option.

    ``path`` and ``problem`` are kept apart so that a caller can name its own way to skip such files.
    """

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}{hint}")


@dataclass
class LoadReport:
    """Counts what a loader skipped (``on_error="skip"``) and why; pass one in to receive them."""

    loaded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    faces_missing: int = 0

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 1000:
            self.reasons.append(reason)

    def summary(self) -> str:
        return f"loaded {self.loaded}, skipped {self.skipped}, faces missing {self.faces_missing}"


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def to_rgb_uint8(arr: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Greyscale, RGBA, 16-bit, float and single-channel arrays -> (H, W, 3) uint8."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise DataError(f"{name}: expected an image with 1, 3 or 4 channels, got shape {a.shape}")
    if a.shape[-1] == 4:  # composite on black is wrong for faces; drop alpha instead
        a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16 or (np.issubdtype(a.dtype, np.integer) and a.max(initial=0) > 255):
        return (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return (a * scale + 0.5).clip(0, 255).astype(np.uint8)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    return a.clip(0, 255).astype(np.uint8)


def _pil_to_array(img: Image.Image, name: str) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return to_rgb_uint8(np.asarray(img, dtype=np.uint16), name)
    if img.mode in ("I", "F"):
        a = np.asarray(img)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
        return to_rgb_uint8((a.astype(np.float64) / hi * 255.0).clip(0, 255).astype(np.uint8), name)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        return np.asarray(img)[..., :3].copy()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img).copy()


def read_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); raise DataError naming the file on any failure.

    ``draft`` lets JPEG decoding run at reduced scale (used for fast validation passes).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise DataError(f"{p}: file not found")
    try:
        with Image.open(p) as img:
            if draft is not None:
                img.draft("RGB", draft)
            img.load()
            return _pil_to_array(img, p)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"{p}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def check_image_size(width: int, height: int, name: str, what: str = "image") -> None:
    """Raise :class:`UnusableFileError` when a side of ``what`` (image, frame) is below :data:`MIN_IMAGE_SIZE`."""
    if min(width, height) < MIN_IMAGE_SIZE:
        raise UnusableFileError(
            name,
            f"{what} is {width}x{height} px, below the minimum usable size of "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} px",
        )


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """Check that an image file is usable without decoding it in full; return its ``(width, height)``.

    The header gives format and size; a PNG's chunks are then checked (CRCs, through the end, no
    pixel decode), a JPEG is decoded at 1/8 scale (finds truncation) and other formats are decoded.
    Raises :class:`UnusableFileError` for a missing, unreadable, truncated or too small file.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UnusableFileError(p, "file not found")
    try:
        with Image.open(p) as img:
            size = img.size
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE))
                img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise UnusableFileError(p, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    check_image_size(*size, p)
    return size
