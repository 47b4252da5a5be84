"""Real-face corpus from packaged sources, identity-disjoint splits and the forgery benchmark."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from peft_masm.data.corpus import (
    DEFAULT_SOURCES,
    SOURCES,
    build_forgery_benchmark,
    build_real_face_corpus,
    split_by_identity,
    split_by_person,
)
from peft_masm.data.forgeries import FAMILIES

_FEATURES = datasets.Features(
    {"image": datasets.Image(), "source": datasets.Value("string"), "identity": datasets.Value("string")}
)


def _toy_corpus(n=6):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"image": imgs, "source": ["s"] * n, "identity": [f"id{i % 3}" for i in range(n)]}, features=_FEATURES
    )


def _people_corpus(n_people=120, lfw=100, video=24):
    """The shape of the grown corpus: one big unnamed source, one video person, many named people."""
    img = Image.new("RGB", (8, 8))
    source = ["lfw_subset"] * lfw + ["carphone"] * video + ["nba"] * n_people
    identity = ["lfw_subset"] * lfw + ["carphone"] * video + [f"nba-p{k}" for k in range(n_people)]
    return datasets.Dataset.from_dict(
        {"image": [img] * len(source), "source": source, "identity": identity}, features=_FEATURES
    )


def _assert_person_disjoint(parts):
    assert list(parts) == ["train", "validation", "test"]
    seen = [set(parts[k]["identity"]) for k in parts]
    for a in range(3):
        for b in range(a + 1, 3):
            assert seen[a].isdisjoint(seen[b]), f"a person in {list(parts)[a]} and {list(parts)[b]}"


def test_split_by_person_three_ways_keeps_groups_whole():
    ds = _people_corpus()
    for seed in range(5):
        parts = split_by_person(ds, val_fraction=0.15, test_fraction=0.15, seed=seed)
        _assert_person_disjoint(parts)
        assert sum(len(p) for p in parts.values()) == len(ds)
        # The unnamed source is one group: all of it in a single split.
        holding = [k for k, p in parts.items() if "lfw_subset" in p["source"]]
        assert len(holding) == 1 and parts[holding[0]]["source"].count("lfw_subset") == 100
        for k, frac in (("validation", 0.15), ("test", 0.15)):
            assert abs(len(parts[k]) - frac * len(ds)) <= 3, (seed, k, len(parts[k]))
    a, b = split_by_person(ds, seed=1), split_by_person(ds, seed=1)
    assert a["test"]["identity"] == b["test"]["identity"]  # seeded
    assert split_by_person(ds, seed=2)["test"]["identity"] != a["test"]["identity"]


def test_split_by_person_fixed_identities_sources_and_errors():
    ds = _people_corpus()
    parts = split_by_person(ds, test_identities=["lfw_subset"], val_identities=["nba-p0", "nba-p1"])
    assert set(parts["test"]["identity"]) == {"lfw_subset"}
    assert set(parts["validation"]["identity"]) == {"nba-p0", "nba-p1"}
    assert len(parts["train"]) == len(ds) - 102
    by_source = split_by_person(ds, val_fraction=0.1, test_fraction=0.2, key="source", seed=0)
    assert sorted(s for p in by_source.values() for s in set(p["source"])) == [
        "carphone",
        "lfw_subset",
        "nba",
    ]
    # Three groups and small targets: every split still gets one (the smallest groups move).
    tiny = split_by_person(_toy_corpus(), seed=0)
    _assert_person_disjoint(tiny)
    assert all(len(p) > 0 for p in tiny.values())
    with pytest.raises(ValueError, match="not in the dataset"):
        split_by_person(ds, test_identities=["nobody"])
    with pytest.raises(ValueError, match="both"):
        split_by_person(ds, test_identities=["nba-p3"], val_identities=["nba-p3"])
    with pytest.raises(ValueError, match="sum below 1"):
        split_by_person(ds, val_fraction=0.5, test_fraction=0.5)


def test_corpus_cache_keys(tmp_path):
    # The default sources keep their old cache (make demo's data); other sources get a key naming them.
    toy = _toy_corpus()
    toy.save_to_disk(str(tmp_path / "v2-s224-auto-cp24-lfw1"))
    assert len(build_real_face_corpus(cache_dir=tmp_path)) == len(toy)
    assert len(build_real_face_corpus(cache_dir=tmp_path, sources=DEFAULT_SOURCES[::-1])) == len(toy)
    toy.select(range(2)).save_to_disk(str(tmp_path / "v3-s64-auto-lfw_subset+nba"))
    assert len(build_real_face_corpus(cache_dir=tmp_path, size=64, sources=("nba", "lfw_subset"))) == 2
    with pytest.raises(ValueError, match="unknown or no corpus sources"):
        build_real_face_corpus(cache_dir=tmp_path, sources=("celeba",))
    with pytest.raises(ValueError, match="contradicts"):
        build_real_face_corpus(cache_dir=tmp_path, sources=("lfw_subset",), include_lfw=False)
    assert set(DEFAULT_SOURCES) < set(SOURCES)


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


@pytest.mark.slow
def test_grown_corpus_named_people_split_three_ways(tmp_path, capsys):
    """Issue 11: at least 300 crops of at least 60 people from registry sources, split by person."""
    corpus = build_real_face_corpus(cache_dir=tmp_path, size=64, sources=("nba", "solvay", "lfw_subset"))
    log = capsys.readouterr().out
    assert "83 placeholder silhouettes and 18 files of byte-identical pairs dropped" in log
    src, ids = corpus["source"], corpus["identity"]
    nba = [i for i, s in zip(ids, src) if s == "nba"]
    assert len(nba) >= 360 and len(set(nba)) == len(nba)  # one headshot per named player
    assert "nba-AJ_Johnson" in nba and "nba-Kobe_Bufkin" not in nba  # one of a byte-identical pair
    assert "nba-Ace_Bailey" not in nba and "nba-Cooper_Flagg" not in nba  # placeholder silhouettes
    solvay = [i for i, s in zip(ids, src) if s == "solvay"]
    assert len(solvay) >= 27 and len(set(solvay)) == len(solvay)
    assert src.count("lfw_subset") == 100 and {i for i, s in zip(ids, src) if s == "lfw_subset"} == {
        "lfw_subset"
    }
    assert len(corpus) >= 300 and len(set(ids)) >= 60
    assert corpus[0]["image"].size == (64, 64)
    for seed in range(3):
        parts = split_by_person(corpus, seed=seed)
        _assert_person_disjoint(parts)
        assert [k for k, p in parts.items() if "lfw_subset" in p["source"]] in (
            ["train"],
            ["validation"],
            ["test"],
        )
        for k in ("validation", "test"):
            assert len(parts[k]) >= 60 and len(set(parts[k]["identity"])) >= 50
    again = build_real_face_corpus(cache_dir=tmp_path, size=64, sources=("lfw_subset", "solvay", "nba"))
    assert again["identity"] == ids  # cached, and the order of sources does not matter
