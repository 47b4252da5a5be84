"""Forgery families: uniform signature, determinism, masks, locality, and the picture sheet."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from peft_masm.data.forgeries import (
    FAMILIES,
    FAMILY_GROUPS,
    GROUPS,
    NEEDS_DONOR,
    draw_sheet,
    face_mask,
    families_by_group,
)

NEW_FAMILIES = ["seamless_swap", "face_warp", "resample_blend", "sensor_noise", "webp_patch"]


@pytest.fixture(scope="module")
def faces():
    a = np.ascontiguousarray(astronaut()[20:212, 150:342])  # 192x192 centred face
    b = np.ascontiguousarray(np.flipud(astronaut()[300:492, 100:292]))
    return a, b


def test_at_least_six_named_families():
    assert {"sbi", "colour_swap", "gan_upsample", "double_jpeg", "denoise_renoise", "spectral_peaks"} <= set(
        FAMILIES
    )


def test_families_come_in_mechanism_groups():
    assert set(FAMILY_GROUPS) == set(FAMILIES) and len(FAMILIES) >= 8
    assert set(NEW_FAMILIES) <= set(FAMILIES)
    assert len(GROUPS) >= 5 and set(GROUPS) == set(FAMILY_GROUPS.values())
    assert {"blending", "transfer", "geometry", "resampling", "noise", "compression", "frequency"} == set(
        GROUPS
    )
    by_group = families_by_group()
    assert sorted(f for fams in by_group.values() for f in fams) == sorted(FAMILIES)
    assert by_group["blending"] == ["sbi", "seamless_swap"] and by_group["geometry"] == ["face_warp"]
    assert families_by_group(["webp_patch", "sbi"]) == {"blending": ["sbi"], "compression": ["webp_patch"]}
    with pytest.raises(ValueError, match="unknown forgery families"):
        families_by_group(["deepfake_magic"])
    assert NEEDS_DONOR == {"colour_swap", "seamless_swap"}


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
    for name in NEEDS_DONOR:
        with pytest.raises(ValueError, match="donor"):
            FAMILIES[name](faces[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        FAMILIES["sbi"](faces[0].astype(np.float32), np.random.default_rng(0))


def test_spectral_peaks_leave_spectral_peaks(faces):
    face = faces[0]
    fake, _ = FAMILIES["spectral_peaks"](face, np.random.default_rng(1))
    spec = lambda x: np.abs(np.fft.fft2(x.astype(np.float32).mean(-1)))  # noqa: E731
    ratio = spec(fake) / (spec(face) + 1e-3)
    assert ratio[8:-8, 8:-8].max() > 5  # new isolated high-frequency energy


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_families_leave_the_outside_untouched(name, faces):
    face, donor = faces
    for seed in range(3):
        fake, mask = FAMILIES[name](face, np.random.default_rng(seed), donor=donor)
        assert np.array_equal(fake[mask == 0], face[mask == 0])
        assert (mask < 0.01).mean() > 0.3  # a local change, not the whole crop


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_change_greyscale_faces(name, faces):
    # lfw_subset and the Solvay photo are greyscale: a "fake" equal to its real would be label noise.
    grey = np.repeat(faces[0].mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    donor = np.repeat(faces[1].mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    fake, mask = FAMILIES[name](grey, np.random.default_rng(0), donor=donor)
    diff = np.abs(fake.astype(np.float32) - grey.astype(np.float32)).mean(-1)
    assert diff[mask > 0.9].mean() > 0.4


def test_seamless_swap_takes_the_donors_texture_with_matched_colour(faces):
    face, donor = faces
    fake, mask = FAMILIES["seamless_swap"](face, np.random.default_rng(0), donor=donor)
    inner = mask > 0.9
    f, d, r = (x.astype(np.float32)[inner] for x in (fake, donor, face))
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
    assert corr(f, d) > corr(f, r)  # the inner face now follows the donor
    ring = (mask > 0.01) & (mask < 0.3)  # near the seam the colours still match the target
    assert np.abs(fake[ring].astype(np.float32).mean(0) - face[ring].astype(np.float32).mean(0)).max() < 15


def test_face_warp_moves_pixels_without_recolouring(faces):
    face = faces[0].astype(np.float32)
    fake, mask = FAMILIES["face_warp"](faces[0], np.random.default_rng(0))
    inner = mask > 0.9
    err = np.abs(fake - face).mean(-1)
    # Every changed pixel is (nearly) some original pixel from close by: the best shift within
    # +-20 px explains it far better than no shift does (a colour or noise change would not be).
    pad = np.pad(face, ((20, 20), (20, 20), (0, 0)), mode="reflect")
    h, w = face.shape[:2]
    best = np.full((h, w), np.inf, np.float32)
    for dy in range(41):
        for dx in range(41):
            best = np.minimum(best, np.abs(fake - pad[dy : dy + h, dx : dx + w]).mean(-1))
    assert err[inner].mean() > 3
    # (0.02 here; 0.07-0.4 for resample_blend, webp_patch, colour_swap and sensor_noise.)
    assert np.median(best[inner]) < 0.06 * np.median(err[inner])


def test_resample_blend_removes_fine_detail_or_rings(faces):
    face = faces[0]
    lap = lambda x: np.abs(cv2.Laplacian(x.astype(np.float32).mean(-1), cv2.CV_32F))  # noqa: E731
    changed = 0
    for seed in range(6):
        fake, mask = FAMILIES["resample_blend"](face, np.random.default_rng(seed))
        inner = mask > 0.9
        ratio = lap(fake)[inner].mean() / lap(face)[inner].mean()
        changed += abs(np.log(ratio)) > 0.1  # blurred (< 0.9) or over-sharpened (> 1.1)
    assert changed >= 5


def test_sensor_noise_is_signal_dependent():
    flat = np.full((128, 128, 3), 30, np.uint8)
    flat[:, 64:] = 220  # dark left half, bright right half
    fake, mask = FAMILIES["sensor_noise"](flat, np.random.default_rng(0))
    res = fake.astype(np.float32) - flat
    inner = mask > 0.9
    dark, bright = res[:, :64][inner[:, :64]], res[:, 64:][inner[:, 64:]]
    assert bright.std() > 1.5 * dark.std()  # Poisson-Gaussian: the variance grows with intensity


def test_webp_patch_is_a_blocky_codec_not_noise(faces):
    face = faces[0]
    fake, mask = FAMILIES["webp_patch"](face, np.random.default_rng(0))
    inner = mask > 0.9
    res = fake.astype(np.float32) - face
    # Lossy coding removes detail: the region's high-pass energy drops (noise would raise it).
    hp = lambda x: np.abs(x - cv2.GaussianBlur(x, (0, 0), 1.0))  # noqa: E731
    assert hp(fake.astype(np.float32))[inner].mean() < hp(face.astype(np.float32))[inner].mean()
    assert np.abs(res[inner]).mean() > 1


def test_face_mask_is_soft(faces):
    m = face_mask((64, 64), np.random.default_rng(0))
    assert 0.0 < m[m > 0].min() < 0.5  # feathered edge


def test_sheet(tmp_path, faces):
    out = draw_sheet(list(faces), str(tmp_path / "sheet.png"), size=64)
    from PIL import Image

    img = Image.open(out)
    assert img.size == (64 * (1 + len(FAMILIES)), 24 + 64 * 3 * 2)
    some = draw_sheet(list(faces), str(tmp_path / "some.png"), size=64, families=["face_warp", "webp_patch"])
    assert Image.open(some).size == (64 * 3, 24 + 64 * 3 * 2)
    with pytest.raises(ValueError, match="unknown forgery families"):
        draw_sheet(list(faces), str(tmp_path / "bad.png"), families=["deepfake_magic"])
