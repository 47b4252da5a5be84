"""Face detection and cropping: 1.3 margin, 5-point similarity alignment where landmarks exist.

Detectors: ``"mtcnn"`` (default; facenet-pytorch's weights fetched from PyPI and run by our own
:mod:`peft_masm.data.mtcnn`; 5 landmarks) and ``"lbp"`` (scikit-image's LBP frontal cascade; no
landmarks, lower recall, no download). ``"auto"`` tries MTCNN and falls back to LBP with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Face", "FaceCropper", "LBPDetector", "load_mtcnn", "crop_face", "ALIGN_TEMPLATE"]

# ArcFace 5-point template (left eye, right eye, nose, mouth left, mouth right) in a 112x112 face box.
ALIGN_TEMPLATE = (
    np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    )
    / 112.0
)


@dataclass
class Face:
    box: np.ndarray  # x1, y1, x2, y2 in pixels
    score: float
    landmarks: np.ndarray | None = None  # (5, 2) x, y


class LBPDetector:
    """scikit-image's LBP frontal-face cascade (``lbpcascade_frontalface_opencv.xml``)."""

    def __init__(self, min_size: int = 24, scale_factor: float = 1.15):
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self.cascade = Cascade(lbp_frontal_face_cascade_filename())
        self.min_size, self.scale_factor = min_size, scale_factor

    def __call__(self, image: np.ndarray) -> list[Face]:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
        h, w = grey.shape
        hits = self.cascade.detect_multi_scale(
            grey,
            scale_factor=self.scale_factor,
            step_ratio=1,
            min_size=(self.min_size, self.min_size),
            max_size=(h, w),
            min_neighbor_number=3,
        )
        return [
            Face(np.array([d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]], np.float32), 1.0)
            for d in hits
        ]


def load_mtcnn(min_face_size: int = 20, max_side: int = 960) -> Callable[[np.ndarray], list[Face]]:
    """MTCNN with facenet-pytorch's weights (fetched once from PyPI, sha256-pinned).

    Images larger than ``max_side`` are searched at reduced scale (boxes are mapped back).
    """
    from ..assets import fetch_asset
    from .mtcnn import MTCNN

    net = MTCNN(fetch_asset("facenet-pytorch") / "facenet_pytorch" / "data", min_face_size=min_face_size)

    def detect(image: np.ndarray) -> list[Face]:
        s = min(1.0, max_side / max(image.shape[:2]))
        small = image if s == 1.0 else cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        boxes, scores, lms = net.detect(small)
        return [Face(b / s, float(sc), lm / s) for b, sc, lm in zip(boxes, scores, lms)]

    return detect


def crop_face(
    image: np.ndarray, face: Face, size: int = 256, margin: float = 1.3, align: bool = True
) -> np.ndarray:
    """Square crop of side ``margin`` x the face box, resized to ``size``; similarity-aligned to the
    5-point template when landmarks exist and ``align`` is set. Borders are reflected, not black.
    """
    if align and face.landmarks is not None:
        # Template points inside a face box that fills 1/margin of the output.
        dst = ((ALIGN_TEMPLATE - 0.5) / margin + 0.5) * size
        mat, _ = cv2.estimateAffinePartial2D(face.landmarks.astype(np.float32), dst, method=cv2.LMEDS)
        if mat is not None:
            return cv2.warpAffine(
                image, mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
            )
    x1, y1, x2, y2 = face.box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * margin / 2
    scale = size / (2 * half)
    mat = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], np.float32)
    return cv2.warpAffine(
        image,
        mat,
        (size, size),
        flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )


class FaceCropper:
    """Callable ``RGB uint8 -> aligned face crop (size x size) or None`` (largest face wins).

    ``detector``: ``"mtcnn"``, ``"lbp"``, ``"auto"`` or any callable ``image -> list[Face]``.
    """

    def __init__(
        self,
        detector: str | Callable[[np.ndarray], list[Face]] = "auto",
        size: int = 256,
        margin: float = 1.3,
        align: bool = True,
        min_score: float = 0.9,
    ):
        self.size, self.margin, self.align, self.min_score = size, margin, align, min_score
        self.name = detector if isinstance(detector, str) else type(detector).__name__
        if detector == "auto":
            try:
                detector, self.name = load_mtcnn(), "mtcnn"
            except Exception as exc:  # registry unreachable, hash mismatch, ...
                warnings.warn(f"MTCNN unavailable ({exc}); falling back to the LBP cascade", stacklevel=2)
                detector, self.name = LBPDetector(), "lbp"
        elif detector == "mtcnn":
            detector = load_mtcnn()
        elif detector == "lbp":
            detector = LBPDetector()
        elif isinstance(detector, str):
            raise ValueError(f"unknown face detector {detector!r}; use 'mtcnn', 'lbp', 'auto' or a callable")
        self.detector = detector

    def detect(self, image: np.ndarray) -> list[Face]:
        return [f for f in self.detector(image) if f.score >= self.min_score]

    def crop_all(self, image: np.ndarray) -> list[tuple[Face, np.ndarray]]:
        return [(f, crop_face(image, f, self.size, self.margin, self.align)) for f in self.detect(image)]

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        faces = self.detect(image)
        if not faces:
            return None
        face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        return crop_face(image, face, self.size, self.margin, self.align)
