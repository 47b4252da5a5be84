"""Forgery families: uniform signature, determinism, masks, locality, and the picture sheet."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from peft_masm.data.forgeries import FAMILIES, draw_sheet, face_mask


@pytest.fixture(scope="module")
def faces():
    a = np.ascontiguousarray(astronaut()[20:212, 150:342])  # 192x192 centred face
    b = np.ascontiguousarray(np.flipud(astronaut()[300:492, 100:292]))
    return a, b


def test_at_least_six_named_families():
    assert {"sbi", "colour_swap", "gan_upsample", "double_jpeg", "denoise_renoise", "spectral_peaks"} <= set(
        FAMILIES
    )


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_contract(name, faces):
    face, donor = faces
    fn = FAMILIES[name]
    fake, mask = fn(face, np.random.default_rng(3), donor=donor)
    assert fake.shape == face.shape and fake.dtype == np.uint8
    assert mask.shape == face.shape[:2] and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() > 0.9
    again, mask2 = fn(face, np.random.default_rng(3), donor=donor)
    assert np.array_equal(fake, again) and np.array_equal(mask, mask2)
    other, _ = fn(face, np.random.default_rng(4), donor=donor)
    assert not np.array_equal(fake, other)
    diff = np.abs(fake.astype(np.float32) - face.astype(np.float32)).mean(-1)
    inside, outside = diff[mask > 0.9].mean(), diff[mask < 0.01].mean()
    assert inside > 0.5, f"{name} barely changes the face ({inside:.2f})"
    # double_jpeg re-saves the whole image (the last save is global by design), so it is only more
    # changed inside; the other families leave the outside untouched.
    factor = 1.2 if name == "double_jpeg" else 2.0
    assert inside > factor * outside, f"{name} is not local: inside {inside:.2f} vs outside {outside:.2f}"
    assert diff.mean() < 40, f"{name} is not subtle: mean |fake - real| = {diff.mean():.1f}"


def test_swap_needs_donor_and_rejects_bad_input(faces):
    with pytest.raises(ValueError, match="donor"):
        FAMILIES["colour_swap"](faces[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        FAMILIES["sbi"](faces[0].astype(np.float32), np.random.default_rng(0))


def test_spectral_peaks_leave_spectral_peaks(faces):
    face = faces[0]
    fake, _ = FAMILIES["spectral_peaks"](face, np.random.default_rng(1))
    spec = lambda x: np.abs(np.fft.fft2(x.astype(np.float32).mean(-1)))  # noqa: E731
    ratio = spec(fake) / (spec(face) + 1e-3)
    assert ratio[8:-8, 8:-8].max() > 5  # new isolated high-frequency energy


def test_face_mask_is_soft(faces):
    m = face_mask((64, 64), np.random.default_rng(0))
    assert 0.0 < m[m > 0].min() < 0.5  # feathered edge


def test_sheet(tmp_path, faces):
    out = draw_sheet(list(faces), str(tmp_path / "sheet.png"), size=64)
    from PIL import Image

    img = Image.open(out)
    assert img.size == (64 * (1 + len(FAMILIES)), 24 + 64 * 3 * 2)
