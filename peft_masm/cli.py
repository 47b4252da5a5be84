"""``masm-detect``: fake probability for images, folders and videos with a trained detector.

    masm-detect --adapter outputs/demo/adapter photo.jpg clip.mp4 faces/
    masm-detect --adapter my-org/clip-masm --json photo.jpg

Faces are found and cropped as in training (``peft_masm.data.faces``: largest face, 5-point alignment, at the
size and margin saved in the detector's ``detector_config.json``); a video's score is the mean over evenly spaced frames. A frame in which no face is
found is scored whole, and its line says so. A file that cannot be read, or an image (video) smaller than
``MIN_IMAGE_SIZE`` px a side, is reported on its own line (``error`` in ``--json``); the others are still
scored, and the exit status is 1. Files in a given folder that are not images or videos (by extension)
are listed on stderr as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .detector import DetectorConfig

__all__ = ["main", "detect", "collect_inputs", "scan_inputs"]


def _not_media() -> str:
    from .data.loaders import IMAGE_EXTS, VIDEO_EXTS

    return (
        f"not an image or video file (by its extension: images {' '.join(sorted(IMAGE_EXTS))}, "
        f"videos {' '.join(sorted(VIDEO_EXTS))})"
    )


def scan_inputs(inputs: list[str]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """``(inputs, skipped)``: ``(path, "image" | "video")`` for every file given or found (recursively)
    in a given folder, and ``(path, reason)`` for each file a folder holds that is neither.
    """
    from .data.loaders import IMAGE_EXTS, VIDEO_EXTS, natural_key

    def kind(p: Path) -> str | None:
        ext = p.suffix.lower()
        return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None

    out: list[tuple[Path, str]] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: natural_key(str(f)))
            files = [f for f in found if kind(f)]
            others = [f for f in found if not kind(f)]
            if not files:
                held = f" (it holds {len(others)} other files, e.g. {others[0].name})" if others else ""
                raise FileNotFoundError(f"{p}: no images or videos in this folder{held}")
            out += [(f, str(kind(f))) for f in files]
            skipped += [(f, _not_media()) for f in others]
        elif p.is_file():
            k = kind(p)
            if k is None:
                raise ValueError(f"{p}: {_not_media()}")
            out.append((p, k))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out, skipped


def collect_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """``(path, "image" | "video")`` for every file given or found (recursively) in a given folder."""
    return scan_inputs(inputs)[0]


def _face_fn(
    training_config: dict[str, Any], detector: str | None, config: DetectorConfig | None = None
) -> Callable[[np.ndarray], tuple[np.ndarray, bool]]:
    """The face step used in training: the crop of the detector's saved ``config`` (size, margin; its defaults
    when None), then (synthetic data) an area resize."""
    import cv2

    from .detector import DetectorConfig

    name = detector or training_config.get("face_detector") or "auto"
    if name == "none" and detector is None:
        name = "auto"  # pre-cropped training data (e.g. DeepfakeBench frames) were cropped the same way
    if name == "none":
        return lambda image: (image, False)
    cropper = (config if config is not None else DetectorConfig()).face_cropper(name)
    resize = training_config.get("face_size") if training_config.get("data") == "synthetic" else None

    def crop(image: np.ndarray) -> tuple[np.ndarray, bool]:
        face = cropper(image)
        if face is None:
            return image, False
        if resize:
            face = cv2.resize(face, (int(resize), int(resize)), interpolation=cv2.INTER_AREA)
        return face, True

    return crop


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^\s*(\S+)\s*\|\s*([A-Z]+)\s*\|", re.MULTILINE)


def _expected_head_report(message: str, heads: set[str]) -> bool:
    """True for transformers' load report when its only rows are MISSING keys of ``heads``.

    Those modules (the detector head) are not in the backbone's checkpoint but come from the adapter,
    so the report's "newly initialized ... Consider training" is expected, not a problem.
    """
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text:
        return False
    rows = [(key, status) for key, status in _REPORT_ROW.findall(text) if key != "Key"]
    return bool(rows) and all(status == "MISSING" and key.split(".")[0] in heads for key, status in rows)


@contextlib.contextmanager
def _quiet_head_report(folder: Path) -> Iterator[None]:
    """Drop only the load report about the adapter's own head (``modules_to_save``) while loading."""
    try:
        heads = set(json.loads((folder / "adapter_config.json").read_text()).get("modules_to_save") or [])
    except (OSError, ValueError, AttributeError):
        heads = set()

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not _expected_head_report(record.getMessage(), heads)

    logger, flt = logging.getLogger("transformers.modeling_utils"), _Filter()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _score_one(
    path: Path, kind: str, frames: int, crop: Callable, face_detection: bool, score: Callable
) -> dict[str, Any]:
    from .data.io import check_image_size, read_image
    from .data.video import read_video_frames

    frames_rgb = [read_image(path)] if kind == "image" else [f for _, f in read_video_frames(path, frames)]
    if frames_rgb:  # a video's frames share one size
        height, width = frames_rgb[0].shape[:2]
        check_image_size(width, height, str(path), "image" if kind == "image" else "frame")
    crops, found = zip(*(crop(f) for f in frames_rgb))
    n_found = int(sum(found))
    warning = None
    if face_detection and n_found < len(crops):
        warning = (
            "no face found: the whole image was scored"
            if kind == "image"
            else f"no face found in {len(crops) - n_found} of {len(crops)} frames: those were scored whole"
        )
    return {
        "path": str(path),
        "type": kind,
        "fake_probability": score(crops),
        "frames": len(crops),
        "faces_found": n_found,
        "face_detection": face_detection,
        "warning": warning,
        "error": None,
    }


def detect(
    adapter: str,
    inputs: list[str],
    frames: int = 8,
    face_detector: str | None = None,
    batch_size: int = 16,
    base_model: str | None = None,
) -> list[dict[str, Any]]:
    """Score every input: ``{"path", "type", "fake_probability", "frames", "faces_found",
    "face_detection", "warning", "error"}`` per image or video.

    ``warning`` says when no face was found (those frames are scored whole). A file that cannot be read
    gets ``error`` (its message) and ``fake_probability`` None; the other inputs are still scored.
    ``base_model`` overrides the base named in the adapter's config (needed when it names none).
    """
    import cv2
    import torch
    from PIL import Image

    from .data.io import DataError
    from .detector import MASMDetector
    from .hub import resolve_adapter

    items = collect_inputs(inputs)
    folder = resolve_adapter(adapter)
    with _quiet_head_report(Path(folder)):
        detector = MASMDetector.from_pretrained(str(folder), base_model=base_model)
    crop = _face_fn(detector.training_config or {}, face_detector, detector.config)
    face_detection = face_detector != "none"  # as in _face_fn: only an explicit "none" switches it off

    def score(crops: tuple[np.ndarray, ...]) -> float:
        with torch.no_grad():
            return float(detector([Image.fromarray(c) for c in crops], batch_size=batch_size).mean())

    results = []
    for path, kind in items:
        try:
            results.append(_score_one(path, kind, frames, crop, face_detection, score))
        except (DataError, OSError, ValueError, cv2.error) as err:
            results.append(
                {
                    "path": str(path),
                    "type": kind,
                    "fake_probability": None,
                    "frames": 0,
                    "faces_found": 0,
                    "face_detection": face_detection,
                    "warning": None,
                    "error": str(err),
                }
            )
    return results


def _probability(text: str) -> float:
    """argparse type: a number in [0, 1] (a threshold on p(fake))."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (a probability), got {text!r}")
    return value


_SHOWN_SKIPPED = 20  # skipped files named one per line on stderr; the rest are counted


def _print_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One stderr line per file a folder held that is not scored (the first few), then the count of the rest."""
    for path, reason in skipped[:_SHOWN_SKIPPED]:
        print(f"masm-detect: skipped {path}: {reason}", file=sys.stderr)
    if len(skipped) > _SHOWN_SKIPPED:
        more = len(skipped) - _SHOWN_SKIPPED
        print(f"masm-detect: skipped {more} more files (not images or videos)", file=sys.stderr)


def _table(results: list[dict[str, Any]], threshold: float) -> str:
    width = max([len(r["path"]) for r in results] + [4])
    lines = [f"{'path':<{width}}  type   frames  faces  p(fake)  verdict"]
    for r in results:
        head = f"{r['path']:<{width}}  {r['type']:<5}  "
        if r["error"] is not None:
            lines.append(f"{head}{'-':>6}  {'-':>5}  {'-':>7}  error: {r['error']}")
            continue
        verdict = "fake" if r["fake_probability"] >= threshold else "real"
        note = f"  ({r['warning']})" if r["warning"] else ""
        lines.append(
            f"{head}{r['frames']:>6}  {r['faces_found']:>5}  {r['fake_probability']:>7.4f}  {verdict}{note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="masm-detect", description="Fake probability per image or video with a trained MASM detector."
    )
    parser.add_argument("--adapter", required=True, help="adapter folder or Hub id (org/name)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--frames", type=int, default=8, help="evenly spaced frames per video (default 8)")
    parser.add_argument(
        "--face-detector",
        choices=["auto", "mtcnn", "lbp", "none"],
        default=None,
        help="override the face detector used in training ('none': score the whole image)",
    )
    parser.add_argument(
        "--threshold", type=_probability, default=0.5, help="verdict threshold on p(fake), in [0, 1]"
    )
    parser.add_argument(
        "--base-model",
        "--base_model",
        dest="base_model",
        default=None,
        help="the backbone the adapter was trained on (Hub id, folder or offline alias); default: the one in its "
        "adapter_config.json, which an adapter built on a model made from a config does not name",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, videos or folders")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .data.io import DataError
    from .detector import BackboneNotAvailableError
    from .hub import AdapterNotAvailableError
    from .tuner import BaseModelMismatchError

    try:
        items, skipped = scan_inputs(args.inputs)
        _print_skipped(skipped)
        files = [str(path) for path, _ in items]
        results = detect(
            args.adapter,
            files,
            frames=args.frames,
            face_detector=args.face_detector,
            base_model=args.base_model,
        )
    except (
        FileNotFoundError,
        ValueError,
        DataError,
        AdapterNotAvailableError,
        BackboneNotAvailableError,
        BaseModelMismatchError,
    ) as err:
        print(f"masm-detect: error: {err}", file=sys.stderr)
        return 2  # nothing scored (bad arguments, adapter or backbone); 1: some inputs failed
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_table(results, args.threshold))
    failed = sum(r["error"] is not None for r in results)
    if failed:
        print(
            f"masm-detect: {failed} of {len(results)} inputs could not be scored (see 'error')",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
