"""The recipe's synthetic cross-forgery splits, on a tiny stand-in corpus (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from recipe_fixtures import make_image_folder  # noqa: E402

from peft_masm.recipe import data as recipe_data  # noqa: E402
from peft_masm.recipe.config import ConfigError, load_config  # noqa: E402


def _corpus(**_: object) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    ids = ["a"] * 6 + ["b"] * 6 + ["c"] * 4 + ["d"] * 4
    images = [Image.fromarray(rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)) for _ in ids]
    return datasets.Dataset.from_dict(
        {"image": images, "source": ["s"] * len(ids), "identity": ids},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "source": datasets.Value("string"),
                "identity": datasets.Value("string"),
            }
        ),
    )


class _Processor:
    def __call__(self, images, return_tensors="pt"):
        import torch

        return {
            "pixel_values": torch.stack(
                [torch.as_tensor(np.asarray(i), dtype=torch.float32).permute(2, 0, 1) for i in images]
            )
        }


@pytest.fixture()
def cfg_args(monkeypatch):
    monkeypatch.setattr(recipe_data, "build_real_face_corpus", _corpus)
    return [
        "--test_identities",
        "c,d",
        "--train_families",
        "sbi,gan_upsample",
        "--test_families",
        "double_jpeg,spectral_peaks",
        "--val_fraction",
        "0.25",
    ]


def test_synthetic_splits_keep_identities_and_families_apart(cfg_args):
    cfg = load_config(None, cfg_args)
    data = recipe_data.build_data(cfg, _Processor())
    train = data.train.with_format(None)
    val = data.val.with_format(None)
    whole = data.tests["held-out identities, all families"].with_format(None)
    assert set(train["identity"]) <= {"a", "b"} and set(val["identity"]) <= {"a", "b"}
    assert set(whole["identity"]) == {"c", "d"}
    assert set(train["family"]) == {"real", "sbi", "gan_upsample"}

    # validation faces are not training faces (same identities, other faces)
    def reals(ds):
        return {np.asarray(r["image"]).tobytes() for r in ds if r["family"] == "real"}

    assert reals(val) and reals(train) and not reals(val) & reals(train)
    assert len(train) == 3 * 9 and len(val) == 3 * 3 and len(whole) == 8 * 5
    fam = whole["family"]
    parent, rows = data.test_subsets["held-out identities, held-out families"]
    assert parent == "held-out identities, all families"
    assert {fam[i] for i in rows} == {"real", "double_jpeg", "spectral_peaks"}
    _, rows = data.test_subsets["held-out family: spectral_peaks"]
    assert {fam[i] for i in rows} == {"real", "spectral_peaks"} and len(rows) == 16
    row = data.train[0]
    assert row["pixel_values"].shape == (3, 48, 48) and row["labels"] in (0, 1)
    assert sorted(set(data.train_labels)) == [0, 1]


def test_people_split_three_ways_with_test_fraction(monkeypatch):
    # the cross-forgery benchmark's split: no person in two of train, validation and test
    seen = {}

    def corpus(**kwargs):
        seen.update(kwargs)
        ids = [f"p{i}" for i in range(10) for _ in range(2)]
        return _corpus().select([0] * len(ids)).remove_columns("identity").add_column("identity", ids)

    monkeypatch.setattr(recipe_data, "build_real_face_corpus", corpus)
    args = ["--test_fraction", "0.3", "--val_fraction", "0.2", "--train_families", "sbi", "--test_families",
            "double_jpeg", "--face_sources", "nba,lfw_subset"]  # fmt: skip
    data = recipe_data.build_data(load_config(None, args), _Processor())
    people = {name: set(ds.with_format(None)["identity"]) for name, ds in
              (("train", data.train), ("val", data.val), ("test", data.tests["held-out identities, all families"]))}  # fmt: skip
    assert (len(people["train"]), len(people["val"]), len(people["test"])) == (5, 2, 3)
    assert not (
        people["train"] & people["val"] or people["train"] & people["test"] or people["val"] & people["test"]
    )
    assert seen["sources"] == ["nba", "lfw_subset"]


def test_bad_test_fraction_and_face_sources_are_one_line():
    with pytest.raises(ConfigError, match="test_fraction must be > 0 with val_fraction \+ test_fraction < 1"):
        load_config(None, ["--test_fraction", "0.9"])
    with pytest.raises(ConfigError, match="face_sources: unknown or none \['celeba'\]; choose from"):
        load_config(None, ["--face_sources", "nba,celeba"])


def test_bad_family_choices_are_rejected(cfg_args):
    with pytest.raises(ConfigError, match="unknown forgery families \\['sbx'\\]"):
        recipe_data.build_data(load_config(None, [*cfg_args, "--train_families", "sbx"]), _Processor())
    with pytest.raises(ConfigError, match="in both train_families and test_families"):
        recipe_data.build_data(load_config(None, [*cfg_args, "--test_families", "sbi"]), _Processor())


def _folder_with_bad_files(root):
    """A folder dataset whose training split holds a text file named .png, a truncated JPEG and a 1x1 PNG."""
    make_image_folder(root, {"train": 4, "val": 2})
    (root / "train/real/notes.png").write_text("not an image")
    jpg = root / "train/fake/cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-200])
    Image.new("RGB", (1, 1), (120, 80, 60)).save(root / "train/fake/dot.png")
    return root


@pytest.mark.parametrize("bad", ["notes.png", "cut.jpg", "dot.png"])
def test_unusable_training_file_is_refused_when_the_data_is_built(tmp_path, bad):
    root = _folder_with_bad_files(tmp_path / "data")
    others = {"notes.png", "cut.jpg", "dot.png"} - {bad}
    for name in others:
        next(root.rglob(name)).unlink()
    cfg = load_config(None, ["--data", "folder", "--train_path", str(root)])
    with pytest.raises(recipe_data.DataError) as info:
        recipe_data.build_data(cfg, _Processor())
    msg = str(info.value)
    assert bad in msg and "on_error: skip" in msg and "\n" not in msg
    problem = {"notes.png": "cannot decode", "cut.jpg": "truncated", "dot.png": "1x1 px, below the minimum"}
    assert problem[bad] in msg


def test_on_error_skip_lists_the_skipped_training_files(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data")
    cfg = load_config(None, ["--data", "folder", "--train_path", str(root), "--on_error", "skip"])
    with pytest.warns(UserWarning, match=r"skipped 3") as record:
        data = recipe_data.build_data(cfg, _Processor())
    text = " ".join(str(w.message) for w in record)
    assert all(name in text for name in ("notes.png", "cut.jpg", "dot.png")) and str(root / "train") in text
    assert len(data.train) == 8 and data.train[0]["pixel_values"].shape == (3, 32, 32)
