"""Tiny models and tiny image folders for the recipe, detector and CLI tests (made by the tests, offline)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def save_tiny_clip(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random CLIP (vision tower + 2-way head) and its image processor (32 px), saved as a model folder."""
    import torch
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        },
        projection_dim=16,
        num_labels=2,
    )
    out = Path(out_dir)
    CLIPForImageClassification(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _image(rng: np.random.Generator, fake: bool, size: int = 32) -> Image.Image:
    """Smooth colour gradients; fakes carry a faint checkerboard (a learnable 'artifact')."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack(
        [rng.uniform(40, 200) + rng.uniform(-40, 40) * xx + rng.uniform(-40, 40) * yy for _ in range(3)],
        axis=-1,
    )
    base += rng.normal(0, 4, base.shape)
    if fake:
        base += (
            30.0 * (((np.arange(size)[:, None] // 2 + np.arange(size)[None, :] // 2) % 2) - 0.5)[..., None]
        )
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_image_folder(root: str | Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``root/{train,val,test}/{real,fake}/*.png`` with a few images each."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 24, "val": 8, "test": 8}
    root = Path(root)
    for split, n in per_class.items():
        for label in ("real", "fake"):
            d = root / split / label
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, label == "fake").save(d / f"{label}_{i}.png")
    return root


def write_config(
    path: str | Path, backbone: str | Path, data_root: str | Path, output_dir: str | Path, **overrides: object
) -> Path:
    """A tiny folder-data recipe config (MASM on the tiny CLIP), YAML."""
    import yaml

    cfg = {
        "backbone": str(backbone),
        "method": "masm",
        "masm": {
            "num_subspaces": 2,
            "subspace_rank": 1,
            "layer_mask": "dynamic",
            "mask_warmup": 1,
            "mask_interval": 2,
            "mask_keep_ratio": 0.5,
            "orthogonality_weight": 0.01,
            "spectral_weight": 0.01,
        },
        "data": "folder",
        "train_path": str(data_root),
        "train_split": "train",
        "val_split": "val",
        "test_sets": [{"name": "tiny-test", "kind": "folder", "path": str(data_root), "split": "test"}],
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 16,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "n_bootstrap": 50,
        "seed": 0,
        "output_dir": str(output_dir),
        "logging_steps": 1,
    }
    cfg.update(overrides)
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(path)


def env(**extra: str) -> dict[str, str]:
    """Subprocess environment: offline Hub, no progress-bar noise, one thread per process."""
    e = dict(os.environ)
    e.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO),
        }
    )
    e.update(extra)
    return e


def earlier_run(out: Path, cfg_path: Path) -> list[Path]:
    """An output folder as a finished run of the recipe leaves it (file names as recipes/train.py writes them);
    returns some of its files."""
    import json

    from peft_masm.recipe.checkpoints import run_hash
    from peft_masm.recipe.config import load_config

    cfg = load_config(cfg_path)
    ckpt = out / "checkpoints" / "step_5"
    ckpt.mkdir(parents=True)
    for name in ("adapter_state.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (ckpt / name).write_bytes(b"x")
    files = sorted(p.name for p in ckpt.iterdir())
    run = {"hash": run_hash(cfg), "identity": cfg.run_identity(), "files": files}
    (ckpt / "run_config.json").write_text(json.dumps(run, default=str))
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return [ckpt / "run_config.json", out / "adapter" / "adapter_model.safetensors", out / "metrics.jsonl"]


def make_deepfakebench(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """A tiny DeepfakeBench layout: frames on disk, ``dataset_json/TinyFF.json`` (train and val videos of 3 frames)
    and ``dataset_json/test_sets.json`` holding two test datasets: ``TinyCDF`` (videos of 3 frames) and
    ``TinyStills`` (one frame each, no videos), with a label dictionary. Returns the JSONs' and labels' paths."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(root)
    labels = {"real": 0, "fake": 1}

    def dataset(name: str, splits: dict[str, int], frames: int) -> dict[str, dict[str, dict[str, object]]]:
        out: dict[str, dict[str, dict[str, object]]] = {}
        for label in labels:
            node: dict[str, object] = {}
            for split, videos in splits.items():
                node[split] = {}
                for v in range(videos):
                    folder = root / "frames" / name / label / split / f"{v:03d}"
                    folder.mkdir(parents=True, exist_ok=True)
                    paths = []
                    for f in range(frames):
                        _image(rng, label == "fake").save(folder / f"{f}.png")
                        paths.append(str((folder / f"{f}.png").relative_to(root)))
                    node[split][f"{v:03d}"] = {"label": f"{name}-{label}", "frames": paths}  # type: ignore[index]
            out[f"{name}-{label}"] = node
        return out

    jsons = root / "dataset_json"
    jsons.mkdir(parents=True, exist_ok=True)
    (jsons / "TinyFF.json").write_text(json.dumps({"TinyFF": dataset("TinyFF", {"train": 8, "val": 3}, 3)}))
    tests = {
        "TinyCDF": dataset("TinyCDF", {"test": 4}, 3),
        "TinyStills": dataset("TinyStills", {"test": 8}, 1),
    }
    (jsons / "test_sets.json").write_text(json.dumps(tests))
    label_dict = {
        f"{d}-{label}": v for d in ("TinyFF", "TinyCDF", "TinyStills") for label, v in labels.items()
    }
    (root / "labels.json").write_text(json.dumps(label_dict))
    return {"train": jsons / "TinyFF.json", "tests": jsons / "test_sets.json", "labels": root / "labels.json"}
