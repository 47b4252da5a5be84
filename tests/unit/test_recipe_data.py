"""The recipe's synthetic cross-forgery splits, on a tiny stand-in corpus (no downloads)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from peft_masm.recipe import data as recipe_data
from peft_masm.recipe.config import ConfigError, load_config


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


def test_bad_family_choices_are_rejected(cfg_args):
    with pytest.raises(ConfigError, match="unknown forgery families \\['sbx'\\]"):
        recipe_data.build_data(load_config(None, [*cfg_args, "--train_families", "sbx"]), _Processor())
    with pytest.raises(ConfigError, match="in both train_families and test_families"):
        recipe_data.build_data(load_config(None, [*cfg_args, "--test_families", "sbi"]), _Processor())
