"""``masm-detect``: fake probability for images, folders and videos with a trained detector.

    masm-detect --adapter outputs/demo/adapter photo.jpg clip.mp4 faces/
    masm-detect --adapter my-org/clip-masm --json photo.jpg

Faces are found and cropped as in training (``peft_masm.data.faces``: largest face, 1.3 margin,
5-point alignment); a video's score is the mean over evenly spaced frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "detect", "collect_inputs"]


def collect_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """``(path, "image" | "video")`` for every file given or found (recursively) in a given folder."""
    from .data.loaders import IMAGE_EXTS, VIDEO_EXTS, natural_key

    def kind(p: Path) -> str | None:
        ext = p.suffix.lower()
        return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None

    out: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(
                (f for f in p.rglob("*") if f.is_file() and kind(f)), key=lambda f: natural_key(str(f))
            )
            if not files:
                raise FileNotFoundError(f"{p}: no images or videos in this folder")
            out += [(f, kind(f)) for f in files]
        elif p.is_file():
            k = kind(p)
            if k is None:
                raise ValueError(f"{p}: not an image or video file (by its extension)")
            out.append((p, k))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _face_fn(
    training_config: dict[str, Any], detector: str | None
) -> Callable[[np.ndarray], tuple[np.ndarray, bool]]:
    """The face step used in training: crop at 256 px with a 1.3 margin, then (synthetic data) an area resize."""
    import cv2

    from .data.faces import FaceCropper

    name = detector or training_config.get("face_detector") or "auto"
    if name == "none" and detector is None:
        name = "auto"  # pre-cropped training data (e.g. DeepfakeBench frames) were cropped the same way
    if name == "none":
        return lambda image: (image, False)
    cropper = FaceCropper(detector=name, size=256, margin=1.3)
    resize = training_config.get("face_size") if training_config.get("data") == "synthetic" else None

    def crop(image: np.ndarray) -> tuple[np.ndarray, bool]:
        face = cropper(image)
        if face is None:
            return image, False
        if resize:
            face = cv2.resize(face, (int(resize), int(resize)), interpolation=cv2.INTER_AREA)
        return face, True

    return crop


def detect(
    adapter: str, inputs: list[str], frames: int = 8, face_detector: str | None = None, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Score every input: ``{"path", "type", "fake_probability", "frames", "faces_found"}`` per image or video."""
    import torch
    from PIL import Image

    from .data.io import read_image
    from .data.video import read_video_frames
    from .detector import load_detector, predict_proba, read_training_config
    from .hub import resolve_adapter

    items = collect_inputs(inputs)
    folder = resolve_adapter(adapter)
    model, processor = load_detector(str(folder))
    crop = _face_fn(read_training_config(folder), face_detector)
    results = []
    for path, kind in items:
        frames_rgb = (
            [read_image(path)] if kind == "image" else [f for _, f in read_video_frames(path, frames)]
        )
        crops, found = zip(*(crop(f) for f in frames_rgb))
        pixels = processor(images=[Image.fromarray(c) for c in crops], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = predict_proba(model, pixels, batch_size=batch_size)
        results.append(
            {
                "path": str(path),
                "type": kind,
                "fake_probability": float(probs.mean()),
                "frames": len(crops),
                "faces_found": int(sum(found)),
            }
        )
    return results


def _table(results: list[dict[str, Any]], threshold: float) -> str:
    width = max([len(r["path"]) for r in results] + [4])
    lines = [f"{'path':<{width}}  type   frames  faces  p(fake)  verdict"]
    for r in results:
        verdict = "fake" if r["fake_probability"] >= threshold else "real"
        lines.append(
            f"{r['path']:<{width}}  {r['type']:<5}  {r['frames']:>6}  {r['faces_found']:>5}  "
            f"{r['fake_probability']:>7.4f}  {verdict}"
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
    parser.add_argument("--threshold", type=float, default=0.5, help="verdict threshold on p(fake)")
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
        results = detect(args.adapter, args.inputs, frames=args.frames, face_detector=args.face_detector)
    except (
        FileNotFoundError,
        ValueError,
        DataError,
        AdapterNotAvailableError,
        BackboneNotAvailableError,
        BaseModelMismatchError,
    ) as err:
        print(f"masm-detect: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_table(results, args.threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
