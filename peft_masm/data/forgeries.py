"""Synthetic forgery families: real face crop -> (fake image, blend mask).

Every family has the same signature::

    fn(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None)
        -> tuple[np.ndarray, np.ndarray]   # fake (H,W,3) uint8, mask (H,W) float32 in [0,1]

The mask is the soft region that was altered (0 = untouched). Results depend only on the inputs
and ``rng``, so a seeded generator reproduces them. ``FAMILIES`` maps names to functions;
``FAMILY_GROUPS`` maps each family to the mechanism it imitates (``GROUPS``: blending, transfer,
geometry, resampling, noise, compression, frequency).
Faces are assumed to be centred crops (as :class:`peft_masm.data.faces.FaceCropper` makes), so the
altered region is a jittered, feathered ellipse over the inner face.

Run ``python -m peft_masm.data.sheet --out sheet.png`` for a picture sheet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import cv2
import numpy as np

__all__ = [
    "FAMILIES",
    "FAMILY_GROUPS",
    "GROUPS",
    "NEEDS_DONOR",
    "families_by_group",
    "Forgery",
    "face_mask",
    "self_blend",
    "colour_swap",
    "gan_upsample",
    "double_jpeg",
    "denoise_renoise",
    "spectral_peaks",
    "seamless_swap",
    "face_warp",
    "resample_blend",
    "sensor_noise",
    "webp_patch",
    "draw_sheet",
]

Forgery = Callable[..., tuple[np.ndarray, np.ndarray]]


def _check(face: np.ndarray) -> np.ndarray:
    if not isinstance(face, np.ndarray) or face.ndim != 3 or face.shape[2] != 3 or face.dtype != np.uint8:
        got = getattr(face, "shape", type(face).__name__), getattr(face, "dtype", "")
        raise ValueError(
            f"face must be an (H, W, 3) uint8 RGB array, got {got}; use peft_masm.data.io.to_rgb_uint8 first"
        )
    if min(face.shape[:2]) < 16:
        raise ValueError(f"face of {face.shape[:2]} is too small to forge (need at least 16x16)")
    return face


def face_mask(shape: tuple[int, int], rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A jittered, feathered ellipse over the inner face of a centred crop (float32 in [0,1])."""
    h, w = shape
    cx = w * (0.5 + rng.uniform(-0.03, 0.03))
    cy = h * (0.55 + rng.uniform(-0.03, 0.03))
    ax = w * rng.uniform(0.22, 0.30) * scale
    ay = h * rng.uniform(0.28, 0.36) * scale
    angle = rng.uniform(-10, 10)
    mask: np.ndarray = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (int(cx), int(cy)), (max(int(ax), 2), max(int(ay), 2)), angle, 0, 360, 1.0, -1)
    # Irregular boundary: erode/dilate a little, then feather.
    k = max(3, int(min(h, w) * rng.uniform(0.02, 0.06)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    sigma = min(h, w) * rng.uniform(0.02, 0.06)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    return (mask / max(float(mask.max()), 1e-6)).astype(np.float32)


def _blend(base: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    out = source.astype(np.float32) * m + base.astype(np.float32) * (1.0 - m)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def self_blend(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """SBI (Shiohara & Yamasaki, CVPR 2022): a colour-jittered, slightly warped copy of the same face
    blended back through a soft mask; leaves blending boundaries and statistics inconsistencies."""
    face = _check(face)
    h, w = face.shape[:2]
    src: np.ndarray = face.astype(np.float32)
    src = src * rng.uniform(0.94, 1.06, size=3) + rng.uniform(-8, 8, size=3)  # per-channel gain/offset
    src = np.clip(src, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        src = cv2.GaussianBlur(src, (0, 0), rng.uniform(0.5, 1.2))
    s = rng.uniform(0.95, 1.05)
    mat = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-2, 2), s)
    mat[:, 2] += rng.uniform(-0.02, 0.02, size=2) * (w, h)
    src = cv2.warpAffine(src, mat, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    mask = face_mask((h, w), rng)
    return _blend(face, src, mask), mask


def _match_stats(src: np.ndarray, ref: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Move src's per-channel Lab mean/std toward ref's inside mask by ``strength`` (0..1)."""
    s = cv2.cvtColor(src, cv2.COLOR_RGB2LAB).astype(np.float32)
    r = cv2.cvtColor(ref, cv2.COLOR_RGB2LAB).astype(np.float32)
    m = mask > 0.5
    if m.sum() < 16:
        return src
    sm, ss = s[m].mean(0), s[m].std(0) + 1e-3
    rm, rs = r[m].mean(0), r[m].std(0) + 1e-3
    tm, ts = sm + strength * (rm - sm), ss + strength * (rs - ss)
    out = (s - sm) / ss * ts + tm
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def colour_swap(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Identity swap: the donor's inner face pasted into ``face`` with only partial colour/statistics
    matching, so illumination and colour disagree across the boundary. Needs ``donor`` (another
    identity's aligned crop; resized to ``face``'s size)."""
    face = _check(face)
    if donor is None:
        raise ValueError("colour_swap needs a donor face of another identity: fn(face, rng, donor=other)")
    donor = _check(donor)
    h, w = face.shape[:2]
    if donor.shape[:2] != (h, w):
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA)
    mask = face_mask((h, w), rng, scale=0.9)
    src = _match_stats(donor, face, mask, strength=rng.uniform(0.3, 0.7))
    return _blend(face, src, mask), mask


def gan_upsample(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """GAN-style synthesis trace: the face region is down-sampled and re-synthesised by a strided
    transposed convolution (zero insertion + an uneven 4x4 kernel), leaving a periodic checkerboard."""
    face = _check(face)
    h, w = face.shape[:2]
    f = 2
    small = cv2.resize(face, (w // f, h // f), interpolation=cv2.INTER_AREA).astype(np.float32)
    up = np.zeros((small.shape[0] * f, small.shape[1] * f, 3), np.float32)
    up[::f, ::f] = small
    base = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]).astype(np.float32)
    kern = base * (1.0 + rng.uniform(-0.25, 0.25, size=base.shape).astype(np.float32))
    # Normalise so each of the 4 output phases has mean gain ~1 but unequal gains (the checkerboard).
    kern *= (f * f) / kern.sum()
    up = cv2.filter2D(up, -1, kern, borderType=cv2.BORDER_REFLECT_101)
    up = cv2.resize(up, (w, h), interpolation=cv2.INTER_NEAREST) if up.shape[:2] != (h, w) else up
    up = cv2.GaussianBlur(up, (0, 0), rng.uniform(0.3, 0.6))
    mask = face_mask((h, w), rng)
    return _blend(face, np.clip(up, 0, 255), mask), mask


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def double_jpeg(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Aligned vs non-aligned double JPEG: the face region carries an earlier compression on an 8x8
    grid shifted by a non-multiple of 8, then the whole image is saved once more on the normal grid."""
    face = _check(face)
    h, w = face.shape[:2]
    q1, q2 = int(rng.integers(55, 80)), int(rng.integers(80, 95))
    dy, dx = (int(v) for v in rng.integers(1, 8, size=2))
    shifted = np.roll(face, (dy, dx), axis=(0, 1))
    first = np.roll(_jpeg(shifted, q1), (-dy, -dx), axis=(0, 1))
    mask = face_mask((h, w), rng)
    return _jpeg(_blend(face, first, mask), q2), mask


def denoise_renoise(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Local denoise-and-renoise: the camera noise of the face region is removed (edge-preserving
    filter) and replaced by synthetic Gaussian noise of another level and colour correlation."""
    face = _check(face)
    h, w = face.shape[:2]
    clean = cv2.bilateralFilter(face, d=5, sigmaColor=rng.uniform(20, 40), sigmaSpace=rng.uniform(3, 6))
    sigma = rng.uniform(2.0, 5.0)
    grey = rng.normal(0, sigma, size=(h, w, 1))
    colour = rng.normal(0, sigma, size=(h, w, 3))
    rho = rng.uniform(0.0, 0.8)
    noise = rho * grey + (1 - rho) * colour
    renoised = np.clip(clean.astype(np.float32) + noise, 0, 255)
    mask = face_mask((h, w), rng)
    return _blend(face, renoised, mask), mask


def spectral_peaks(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Periodic spectral peaks: a few faint high-frequency 2-D sinusoids (as left by up-sampling
    layers of generators) added inside the face region; invisible at a glance, sharp in the FFT."""
    face = _check(face)
    h, w = face.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        fy, fx = rng.uniform(0.15, 0.5, size=2) * rng.choice([-1, 1], size=2)
        pattern += np.cos(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    pattern *= rng.uniform(2.0, 4.0) / max(float(np.abs(pattern).max()), 1e-6)
    tint = rng.uniform(0.7, 1.0, size=3).astype(np.float32)
    mask = face_mask((h, w), rng)
    src = face.astype(np.float32) + pattern[..., None] * tint
    return _blend(face, src, mask), mask


def seamless_swap(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Face-swap-like blending: the donor's inner face put into ``face`` by gradient-domain (Poisson)
    cloning, then feathered in through the soft mask. Colours agree at the boundary (unlike
    ``colour_swap``); what is left is the blending seam and a face whose texture is another person's.
    Needs ``donor`` (another identity's aligned crop; resized to ``face``'s size)."""
    face = _check(face)
    if donor is None:
        raise ValueError("seamless_swap needs a donor face of another identity: fn(face, rng, donor=other)")
    donor = _check(donor)
    h, w = face.shape[:2]
    if donor.shape[:2] != (h, w):
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA)
    mask = face_mask((h, w), rng, scale=rng.uniform(0.85, 1.0))
    region = (mask > 0.2).astype(np.uint8)
    region[:2], region[-2:], region[:, :2], region[:, -2:] = 0, 0, 0, 0  # cloning needs a margin
    x, y, bw, bh = cv2.boundingRect(region)
    if bw < 4 or bh < 4:  # pragma: no cover - face_mask always covers the inner face
        return face.copy(), np.zeros((h, w), np.float32)
    mode = cv2.MIXED_CLONE if rng.random() < 0.25 else cv2.NORMAL_CLONE
    cloned = cv2.seamlessClone(donor, face, region * 255, (x + bw // 2, y + bh // 2), mode)
    # Feather to zero at the cloned region's edge, so the mask is soft and nothing outside changes.
    mask = (np.clip((mask - 0.2) / 0.8, 0, 1) * region).astype(np.float32)
    mask /= max(float(mask.max()), 1e-6)
    return _blend(face, cloned, mask), mask


def face_warp(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Geometry: the inner face is reshaped by a small affine change (scale, shear, rotation, shift
    about the face centre) plus a smooth elastic field, faded out by the soft mask, as face
    reshaping and reenactment leave (resampled texture, distorted proportions, no colour change)."""
    face = _check(face)
    h, w = face.shape[:2]
    mask = face_mask((h, w), rng, scale=1.1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * 0.5, h * 0.55
    a = np.eye(2) + rng.uniform(-0.06, 0.06, size=(2, 2))  # scale + shear
    t = np.deg2rad(rng.uniform(-4, 4))
    a = a @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    shift = rng.uniform(-0.025, 0.025, size=2) * (w, h)
    u, v = xx - cx, yy - cy
    ax = a[0, 0] * u + a[0, 1] * v + cx + shift[0] - xx
    ay = a[1, 0] * u + a[1, 1] * v + cy + shift[1] - yy
    field = rng.normal(0, 1, size=(2, h, w)).astype(np.float32)
    sigma = min(h, w) * rng.uniform(0.06, 0.10)
    amp = min(h, w) * rng.uniform(0.015, 0.03)
    ex, ey = (cv2.GaussianBlur(f, (0, 0), sigma) for f in field)
    scale = amp / max(float(np.sqrt(ex**2 + ey**2).max()), 1e-6)
    map_x = (xx + mask * (ax + scale * ex)).astype(np.float32)
    map_y = (yy + mask * (ay + scale * ey)).astype(np.float32)
    warped = cv2.remap(face, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return _blend(face, warped, mask), mask


_DOWN = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_NEAREST)
_UP = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)


def resample_blend(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Resampling: the face region is rendered at a lower resolution (down by 1.6-3x with one kernel)
    and scaled back with another (bilinear, bicubic or Lanczos), optionally sharpened, as face-swap
    pipelines paste a generated face of a smaller size. Leaves blur, ringing and aliasing, no grid."""
    face = _check(face)
    h, w = face.shape[:2]
    f = rng.uniform(1.6, 3.0)
    down = _DOWN[int(rng.integers(len(_DOWN)))]
    up = _UP[int(rng.integers(len(_UP)))]
    small = cv2.resize(face, (max(4, round(w / f)), max(4, round(h / f))), interpolation=down)
    src = cv2.resize(small, (w, h), interpolation=up).astype(np.float32)
    if rng.random() < 0.5:  # unsharp mask, as swap pipelines often sharpen the pasted face
        amount = rng.uniform(0.3, 1.0)
        src = src + amount * (src - cv2.GaussianBlur(src, (0, 0), rng.uniform(0.8, 1.6)))
    mask = face_mask((h, w), rng)
    return _blend(face, np.clip(src, 0, 255), mask), mask


def sensor_noise(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Noise model: another camera's noise in the face region: a fixed multiplicative pattern
    (PRNU-like, slightly correlated across neighbours and channels) plus signal-dependent
    Poisson-Gaussian noise (variance ``a * I + b``), unlike the additive noise of ``denoise_renoise``."""
    face = _check(face)
    h, w = face.shape[:2]
    img = face.astype(np.float32)
    prnu = rng.normal(0, 1, size=(h, w, 3)).astype(np.float32)
    prnu = 0.6 * prnu + 0.4 * prnu.mean(-1, keepdims=True)
    prnu = cv2.GaussianBlur(prnu, (0, 0), rng.uniform(0.4, 0.8))
    prnu *= rng.uniform(0.01, 0.03) / max(float(prnu.std()), 1e-6)
    a, b = rng.uniform(0.3, 1.2), rng.uniform(1.0, 6.0)
    shot = rng.normal(0, 1, size=(h, w, 3)).astype(np.float32) * np.sqrt(a * img + b)
    src = img * (1.0 + prnu) + shot
    mask = face_mask((h, w), rng)
    return _blend(face, np.clip(src, 0, 255), mask), mask


def _webp(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(
        ".webp", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    )
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def webp_patch(face: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None = None):
    """Compression by another codec: the face region went through lossy WebP (VP8: 4x4 transforms in
    16x16 macroblocks, 4:2:0 chroma, in-loop deblocking) on a grid shifted off the image's, while
    the rest of the image did not; the outside is left untouched (unlike ``double_jpeg``)."""
    face = _check(face)
    h, w = face.shape[:2]
    q = int(rng.integers(5, 40))
    dy, dx = (int(v) for v in rng.integers(1, 16, size=2))
    shifted = np.roll(face, (dy, dx), axis=(0, 1))
    coded = np.roll(_webp(shifted, q), (-dy, -dx), axis=(0, 1))
    mask = face_mask((h, w), rng)
    return _blend(face, coded, mask), mask


FAMILIES: dict[str, Forgery] = {
    "sbi": self_blend,
    "colour_swap": colour_swap,
    "gan_upsample": gan_upsample,
    "double_jpeg": double_jpeg,
    "denoise_renoise": denoise_renoise,
    "spectral_peaks": spectral_peaks,
    "seamless_swap": seamless_swap,
    "face_warp": face_warp,
    "resample_blend": resample_blend,
    "sensor_noise": sensor_noise,
    "webp_patch": webp_patch,
}
# The mechanism each family imitates; hold out a whole group to test on an unseen kind of forgery.
FAMILY_GROUPS: dict[str, str] = {
    "sbi": "blending",
    "seamless_swap": "blending",
    "colour_swap": "transfer",
    "face_warp": "geometry",
    "gan_upsample": "resampling",
    "resample_blend": "resampling",
    "denoise_renoise": "noise",
    "sensor_noise": "noise",
    "double_jpeg": "compression",
    "webp_patch": "compression",
    "spectral_peaks": "frequency",
}
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(FAMILY_GROUPS.values()))
# Families whose fn needs ``donor`` (another identity's face).
NEEDS_DONOR: frozenset[str] = frozenset({"colour_swap", "seamless_swap"})


def families_by_group(families: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Mechanism group -> its families (in ``FAMILIES`` order), for ``families`` (default: all)."""
    chosen = list(FAMILIES) if families is None else list(families)
    bad = [f for f in chosen if f not in FAMILY_GROUPS]
    if bad:
        raise ValueError(f"unknown forgery families {bad}; available: {sorted(FAMILIES)}")
    out: dict[str, list[str]] = {}
    for f in FAMILIES:
        if f in chosen:
            out.setdefault(FAMILY_GROUPS[f], []).append(f)
    return out


def draw_sheet(
    faces: list[np.ndarray], out: str, seed: int = 0, size: int = 160, families: Iterable[str] | None = None
) -> str:
    """PNG sheet: one row per face: real, then each family's fake and (below it) its mask; plus a
    row of amplified differences (|fake - real| x 8) so subtle families are visible.
    ``families``: which (default all, in ``FAMILIES`` order)."""
    names = list(FAMILIES) if families is None else list(families)
    bad = [f for f in names if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown forgery families {bad}; available: {sorted(FAMILIES)}")
    rng = np.random.default_rng(seed)
    faces = [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in faces]
    rows = []
    for i, face in enumerate(faces):
        donor = faces[(i + 1) % len(faces)]
        top, mid, bot = [face], [np.zeros_like(face)], [np.zeros_like(face)]
        for name in names:
            fake, mask = FAMILIES[name](face, rng, donor=donor)
            top.append(fake)
            mid.append(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1))
            diff = np.clip(np.abs(fake.astype(np.int16) - face.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
            bot.append(diff)
        rows += [np.concatenate(r, 1) for r in (top, mid, bot)]
    sheet = np.concatenate(rows, 0)
    header = np.full((24, sheet.shape[1], 3), 255, np.uint8)
    for j, name in enumerate(["real", *names]):
        cv2.putText(
            header, name, (j * size + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
    sheet = np.concatenate([header, sheet], 0)
    cv2.imwrite(out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out
