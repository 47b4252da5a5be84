"""Real-face corpus from packaged sources, identity-disjoint splits and the forgery benchmark."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from peft_masm.data.corpus import build_forgery_benchmark, build_real_face_corpus, split_by_identity
from peft_masm.data.forgeries import FAMILIES


def _toy_corpus(n=6):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"image": imgs, "source": ["s"] * n, "identity": [f"id{i % 3}" for i in range(n)]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "source": datasets.Value("string"),
                "identity": datasets.Value("string"),
            }
        ),
    )


def test_split_by_identity_is_disjoint():
    ds = _toy_corpus()
    s = split_by_identity(ds, test_fraction=0.3, seed=1)
    assert set(s["train"]["identity"]).isdisjoint(s["test"]["identity"])
    assert len(s["train"]) + len(s["test"]) == len(ds) and len(s["test"]) > 0
    fixed = split_by_identity(ds, test_identities=["id0"])
    assert set(fixed["test"]["identity"]) == {"id0"}
    with pytest.raises(ValueError, match="not in the dataset"):
        split_by_identity(ds, test_identities=["nobody"])


def test_benchmark_columns_and_seed():
    ds = _toy_corpus()
    b = build_forgery_benchmark(ds, families=["sbi", "colour_swap"], seed=3)
    assert set(b.column_names) == {"image", "label", "video_id", "family", "identity", "source"}
    assert len(b) == 6 * 3 and sum(b["label"]) == 12
    assert set(b["family"]) == {"real", "sbi", "colour_swap"}
    again = build_forgery_benchmark(ds, families=["sbi", "colour_swap"], seed=3)
    assert np.array_equal(np.asarray(b[1]["image"]), np.asarray(again[1]["image"]))
    with pytest.raises(ValueError, match="unknown forgery families"):
        build_forgery_benchmark(ds, families=["deepfake_magic"])


@pytest.mark.slow
def test_real_face_corpus(tmp_path):
    corpus = build_real_face_corpus(cache_dir=tmp_path, size=96, carphone_frames=6)
    assert set(corpus.column_names) == {"image", "source", "identity"}
    sources = set(corpus["source"])
    assert {"carphone", "faceapi", "astronaut", "lfw_subset"} <= sources
    assert corpus["source"].count("carphone") == 6  # MTCNN finds the face in every sampled frame
    assert corpus["source"].count("faceapi") >= 18
    assert corpus[0]["image"].size == (96, 96)
    again = build_real_face_corpus(cache_dir=tmp_path, size=96, carphone_frames=6)  # cached
    assert len(again) == len(corpus)
    split = split_by_identity(corpus, seed=0)
    assert set(split["train"]["identity"]).isdisjoint(split["test"]["identity"])
    test = split["test"].select(range(4))
    bench = build_forgery_benchmark(test, families=list(FAMILIES), seed=0, donors=split["train"])
    assert len(bench) == 4 * (1 + len(FAMILIES))
    one_identity = corpus.filter(lambda r: r["identity"] == "carphone")
    with pytest.raises(ValueError, match="donors="):
        build_forgery_benchmark(one_identity, families=["colour_swap"])
