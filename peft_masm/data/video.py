"""Video frames with OpenCV: N frames spaced evenly over the *whole* video (never the first N)."""

from __future__ import annotations

import os

import cv2
import numpy as np

from .io import DataError

__all__ = ["evenly_spaced_indices", "video_frame_count", "read_video_frames", "read_video_frame"]


def evenly_spaced_indices(total: int, num: int) -> list[int]:
    """Indices of ``num`` frames centred in ``num`` equal segments of ``[0, total)``.

    >>> evenly_spaced_indices(100, 4)
    [12, 37, 62, 87]
    """
    if total <= 0:
        return []
    if num >= total:
        return list(range(total))
    return [int((i + 0.5) * total / num) for i in range(num)]


def _open(path: str) -> cv2.VideoCapture:
    if not os.path.exists(path):
        raise DataError(f"{path}: video file not found")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise DataError(f"{path}: OpenCV cannot open this video (unsupported codec or corrupt file)")
    return cap


def video_frame_count(path: str | os.PathLike) -> int:
    """Number of decodable frames; counts by decoding when the container's header lies or is missing."""
    p = os.fspath(path)
    cap = _open(p)
    try:
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n > 0:
            return n
        n = 0
        while cap.grab():
            n += 1
    finally:
        cap.release()
    if n == 0:
        raise DataError(f"{p}: video has no decodable frames")
    return n


def read_video_frames(
    path: str | os.PathLike, num_frames: int | None = None, indices: list[int] | None = None
) -> list[tuple[int, np.ndarray]]:
    """Decode evenly spaced frames (or the given ``indices``) as ``(index, RGB uint8)`` pairs.

    Frames are read sequentially (grab/retrieve), which is exact for every codec, unlike seeking.
    """
    p = os.fspath(path)
    if indices is None:
        if num_frames is None or num_frames < 1:
            raise ValueError("pass num_frames >= 1 or explicit indices")
        indices = evenly_spaced_indices(video_frame_count(p), num_frames)
    wanted = sorted(set(int(i) for i in indices))
    out: list[tuple[int, np.ndarray]] = []
    cap = _open(p)
    try:
        pos, k = 0, 0
        while k < len(wanted):
            if not cap.grab():
                break
            if pos == wanted[k]:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    out.append((pos, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
                k += 1
            pos += 1
    finally:
        cap.release()
    if not out:
        raise DataError(f"{p}: no frame could be decoded (truncated or unreadable video)")
    return out


def read_video_frame(path: str | os.PathLike, index: int) -> np.ndarray:
    """One frame as RGB uint8: seek, and fall back to sequential decoding if the seek fails."""
    p = os.fspath(path)
    cap = _open(p)
    try:
        if cap.set(cv2.CAP_PROP_POS_FRAMES, int(index)):
            ok, frame = cap.read()
            if ok and frame is not None:
                return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    frames = read_video_frames(p, indices=[index])
    if frames[0][0] != index:
        raise DataError(f"{p}: frame {index} cannot be decoded")
    return frames[0][1]
