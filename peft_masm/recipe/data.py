"""Datasets for the recipes: training / validation / test splits from a :class:`TrainConfig`.

``data: synthetic`` builds the project's offline cross-forgery benchmark (packaged real faces, split by
identity; synthesised fakes; test on held-out identities and held-out forgery families). The other
kinds read user data through ``peft_masm.data`` loaders. Validation is always a held-out part of the
*training* domain; test sets never choose a checkpoint.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from ..data import (
    DataError,
    FaceCropper,
    build_forgery_benchmark,
    build_real_face_corpus,
    load_deepfakebench,
    load_folder,
    load_manifest,
    split_by_identity,
    split_by_person,
    with_image_processor,
)
from ..data.io import UnusableFileError
from .config import ConfigError, TestSetConfig, TrainConfig

__all__ = ["HELD_OUT_FAMILIES", "RecipeData", "SEEN_FAMILIES", "build_data", "labels_of", "load_test_set"]

# The synthetic data's test subsets of held-out people: with the held-out forgery families, and with the trained ones.
HELD_OUT_FAMILIES = "held-out identities, held-out families"
SEEN_FAMILIES = "held-out identities, seen families"


@dataclass
class RecipeData:
    train: Any
    val: Any
    tests: dict[str, Any] = field(default_factory=dict)
    train_labels: list[int] = field(default_factory=list)
    # result name -> (test set name, row indices): metrics on part of a test set without re-scoring it
    test_subsets: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    description: list[str] = field(default_factory=list)  # dataset names for the model card


def labels_of(ds: datasets.Dataset) -> list[int]:
    """Labels without decoding images."""
    return [int(v) for v in ds.with_format(None).select_columns(["label"])["label"]]


def _check_both_classes(labels: list[int], what: str) -> None:
    if not labels:
        raise DataError(f"{what} is empty after filtering; check the paths, split names and filters.")
    counts = Counter(labels)
    if len(counts) < 2:
        only = "real" if 0 in counts else "fake"
        raise DataError(
            f"{what} holds only {only} samples ({len(labels)}); it needs real (0) and fake (1) ones."
        )


def _split_groups(ds: datasets.Dataset, key: str, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    groups = ds.with_format(None).select_columns([key])[key]
    names = sorted(set(groups))
    if len(names) < 2:
        raise DataError(
            f"cannot hold out a validation split: only one {key} group; give val_split a real split."
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    n_val = max(1, round(fraction * len(names)))
    val_names = set(names[:n_val])
    val = [i for i, g in enumerate(groups) if g in val_names]
    train = [i for i, g in enumerate(groups) if g not in val_names]
    return train, val


def _load(kind: str, path: str, split: str | None, cfg: Any, on_error: str) -> datasets.Dataset:
    """One dataset, every listed image checked as it is built (``peft_masm.data.loaders``), not at a step."""
    try:
        return _load_kind(kind, path, split, cfg, on_error)
    except UnusableFileError as err:
        raise DataError(
            f"{err.path}: {err.problem}; replace or remove it, or set on_error: skip "
            "(--on_error skip) to skip unusable files and list them"
        ) from None


def _load_kind(kind: str, path: str, split: str | None, cfg: Any, on_error: str) -> datasets.Dataset:
    if kind == "deepfakebench":
        return load_deepfakebench(
            path,
            label_dict=cfg.label_dict,
            split=split or "test",
            compression=cfg.compression,
            data_root=cfg.data_root,
            frames_per_video=cfg.frames_per_video,
            dataset_name=cfg.dataset_name,
            on_error=on_error,
        )
    if kind == "folder":
        return load_folder(path, split=split, num_frames=cfg.frames_per_video, on_error=on_error)
    if kind == "manifest":
        return load_manifest(
            path, split=split, label_dict=cfg.label_dict, num_frames=cfg.frames_per_video, on_error=on_error
        )
    raise ConfigError(f"unknown data kind {kind!r}")


def _face_cropper(cfg: TrainConfig) -> FaceCropper | None:
    return (
        None if cfg.face_detector == "none" else FaceCropper(detector=cfg.face_detector, size=256, margin=1.3)
    )


def _face_splits(corpus: datasets.Dataset, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """Training, validation and test faces: by person (``test_fraction``), or the ``test_identities`` held out
    for test and ``val_fraction`` of the other faces (people seen in training) for validation."""
    if cfg.test_fraction is not None:
        parts = split_by_person(
            corpus, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
        )
        return parts["train"], parts["validation"], parts["test"]
    parts = split_by_identity(corpus, test_identities=cfg.test_identities)
    train_faces = parts["train"]
    idx = np.random.default_rng(cfg.seed).permutation(len(train_faces))
    n_val = max(2, round(cfg.val_fraction * len(train_faces)))
    return train_faces.select(sorted(idx[n_val:])), train_faces.select(sorted(idx[:n_val])), parts["test"]


def _synthetic(cfg: TrainConfig, processor: Any) -> RecipeData:
    from ..data import FAMILIES

    for what in ("train_families", "test_families"):
        bad = [f for f in getattr(cfg, what) if f not in FAMILIES]
        if bad:
            raise ConfigError(f"{what}: unknown forgery families {bad}; available: {sorted(FAMILIES)}.")
    if not cfg.train_families:
        raise ConfigError("train_families is empty; name at least one forgery family to train on.")
    overlap = set(cfg.train_families) & set(cfg.test_families)
    if overlap:
        raise ConfigError(
            f"families {sorted(overlap)} are in both train_families and test_families; "
            "held-out families must not be trained on."
        )
    corpus = build_real_face_corpus(size=cfg.face_size, include_lfw=cfg.include_lfw,
                                    carphone_frames=cfg.carphone_frames, sources=cfg.face_sources)  # fmt: skip
    fit_faces, val_faces, test_faces = _face_splits(corpus, cfg)
    train = build_forgery_benchmark(
        fit_faces, cfg.train_families, seed=cfg.seed, fakes_per_face=cfg.fakes_per_face
    )
    # Swap donors of another person: from the validation people themselves when people are split (never across
    # splits), else from the training faces (the same people).
    donors = val_faces if cfg.test_fraction is not None else fit_faces
    val = build_forgery_benchmark(val_faces, cfg.train_families, seed=cfg.seed + 1, donors=donors)
    if cfg.max_train_samples is not None:
        train = train.shuffle(seed=cfg.seed).select(range(min(cfg.max_train_samples, len(train))))
    tests: dict[str, datasets.Dataset] = {}
    subsets: dict[str, tuple[str, list[int]]] = {}
    if len(test_faces):
        all_families = list(dict.fromkeys(cfg.train_families + cfg.test_families))
        bench = build_forgery_benchmark(test_faces, all_families, seed=cfg.seed + 2)
        fam = bench["family"]
        whole = "held-out identities, all families"
        tests[whole] = bench

        def rows(families: list[str]) -> tuple[str, list[int]]:
            keep = set(families) | {"real"}
            return whole, [i for i, f in enumerate(fam) if f in keep]

        subsets[SEEN_FAMILIES] = rows(cfg.train_families)
        if cfg.test_families:
            subsets[HELD_OUT_FAMILIES] = rows(cfg.test_families)
            for f in cfg.test_families:
                subsets[f"held-out family: {f}"] = rows([f])
    train_labels = [int(v) for v in train["label"]]
    _check_both_classes(train_labels, "the training set")
    extra = {
        t.name: load_test_set(t, processor, _face_cropper(cfg), cfg.on_error) for t in cfg.test_set_configs()
    }
    _check_both_classes([int(v) for v in val["label"]], "the validation set")
    out = RecipeData(
        train=with_image_processor(train, processor),
        val=with_image_processor(val, processor),
        tests={**{k: with_image_processor(v, processor) for k, v in tests.items()}, **extra},
        train_labels=train_labels,
        test_subsets=subsets,
        description=["peft_masm synthetic cross-forgery benchmark (packaged real faces, synthesised fakes)"],
    )
    return out


def build_data(cfg: TrainConfig, processor: Any) -> RecipeData:
    """Train / validation / test datasets yielding ``pixel_values``, ``labels`` and ``video_id``."""
    if cfg.data == "synthetic":
        return _synthetic(cfg, processor)
    cropper = _face_cropper(cfg)
    full = _load(cfg.data, cfg.train_path, cfg.train_split, cfg, cfg.on_error)
    if cfg.val_split:
        train, val = full, _load(cfg.data, cfg.train_path, cfg.val_split, cfg, cfg.on_error)
    else:
        tr_idx, val_idx = _split_groups(full, "video_id", cfg.val_fraction, cfg.seed)
        train, val = full.select(tr_idx), full.select(val_idx)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    train_labels = labels_of(train)
    _check_both_classes(train_labels, "the training set")
    _check_both_classes(labels_of(val), "the validation set")
    tests = {t.name: load_test_set(t, processor, cropper, cfg.on_error) for t in cfg.test_set_configs()}
    return RecipeData(
        train=with_image_processor(train, processor, face_cropper=cropper),
        val=with_image_processor(val, processor, face_cropper=cropper),
        tests=tests,
        train_labels=train_labels,
        description=[cfg.dataset_name or cfg.train_path or cfg.data],
    )


def load_test_set(t: TestSetConfig, processor: Any, cropper: Any = None, on_error: str = "raise") -> Any:
    """One configured test set, processed for the model."""
    ds = _load(t.kind, t.path, t.split, t, on_error)
    _check_both_classes(labels_of(ds), f"test set {t.name!r}")
    return with_image_processor(ds, processor, face_cropper=cropper)
