"""The model card's "How to load it" code runs as a user would paste it, offline, and scores an image.

Issue 26 item 1: the card of a detector trained on a packaged backbone named the Hub's CLIP (which its
fingerprint check refuses, and which cannot load offline), and its code fed the saved 112 px processor output to
a 224 px CLIP without ``interpolate_pos_encoding=True``. Here a tiny CLIP stands in for the packaged
``clip-vit-b16`` in a ``$PEFT_MASM_CACHE`` laid out as ``peft_masm.backbones.prepare`` writes it, the adapter is
served from a pre-filled Hugging Face cache by its repo id, and the card's code block runs in a fresh process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared fixtures

from hub_fixtures import fill_hf_cache, hub_env  # noqa: E402
from recipe_fixtures import save_tiny_clip  # noqa: E402
from tiny_backbones import save_packaged_like_clip  # noqa: E402

from peft_masm import MASMConfig  # noqa: E402
from peft_masm.detector import MASMDetector, build_detector, load_image_processor, predict_proba  # noqa: E402

REPO_ID = "org/tiny-masm-detector"


def _trained(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """A few optimizer steps, so that the adapter and its head differ from their starting values."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        logits = model(pixel_values=x, interpolate_pos_encoding=True).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def card_code(readme: Path) -> str:
    """The Python block of the card's "How to load it" section."""
    section = readme.read_text().split("## How to load it")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, section
    return blocks[0]


def run_card_code(code: str, workdir: Path, env: dict) -> float:
    """Run the card's code as a pasted script in ``workdir`` (which holds ``face.jpg``); return its p(fake)."""
    (workdir / "snippet.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "snippet.py"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"p\(fake\) = ([0-9.]+)", proc.stdout)
    assert len(found) == 1, proc.stdout
    return float(found[0])


def _face(workdir: Path) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8))
    image.save(workdir / "face.jpg", quality=95)
    return Image.open(workdir / "face.jpg").convert("RGB")


@pytest.mark.slow
def test_card_code_of_a_detector_on_a_packaged_backbone_scores_an_image_offline(tmp_path, monkeypatch):
    cache = tmp_path / "peft-masm-cache"
    save_packaged_like_clip(cache)
    monkeypatch.setenv("PEFT_MASM_CACHE", str(cache))
    model = build_detector("clip-vit-b16", MASMConfig(num_subspaces=1, subspace_rank=1))
    processor = load_image_processor("clip-vit-b16", image_size=48)  # not the base's 32 px, as the demo's 112
    _trained(model, 48)
    training = {"backbone": "clip-vit-b16", "data": "synthetic", "face_size": 48, "image_size": 48}
    folder = MASMDetector(model, processor).save_pretrained(
        tmp_path / "detector", training_config=training, repo_id=REPO_ID
    )
    fill_hf_cache(tmp_path / "hub", REPO_ID, folder)
    card = (folder / "README.md").read_text()
    assert "openai/clip-vit-base-patch16" not in card and "base_model:" not in card.split("---")[1]
    assert "prepare(" in card and "face crop" in card and "masm-detect" in card

    workdir = tmp_path / "user"
    workdir.mkdir()
    face = _face(workdir)
    pixels = processor(images=face, return_tensors="pt")["pixel_values"]
    expected = float(predict_proba(model, pixels)[0])
    env = {**hub_env(cache_dir=tmp_path / "hub", offline=True), "PEFT_MASM_CACHE": str(cache)}
    assert run_card_code(card_code(folder / "README.md"), workdir, env) == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_card_code_of_a_pooler_output_detector_on_a_local_base_scores_an_image(tmp_path):
    base = save_tiny_clip(tmp_path / "base-clip")
    model = build_detector(str(base), MASMConfig(num_subspaces=1, subspace_rank=1), pooling="pooler_output")
    processor = load_image_processor(str(base))
    _trained(model, 32)
    folder = MASMDetector(model, processor).save_pretrained(tmp_path / "detector", repo_id=REPO_ID)
    fill_hf_cache(tmp_path / "hub", REPO_ID, folder)
    code = card_code(folder / "README.md")
    assert "CLIPPoolerClassifier" in code and "interpolate_pos_encoding" not in code

    workdir = tmp_path / "user"
    workdir.mkdir()
    face = _face(workdir)
    expected = float(predict_proba(model, processor(images=face, return_tensors="pt")["pixel_values"])[0])
    env = hub_env(cache_dir=tmp_path / "hub", offline=True)
    assert run_card_code(code, workdir, env) == pytest.approx(expected, abs=1e-3)


def test_plain_save_pretrained_card_loads_onto_the_packaged_backbone(tmp_path, monkeypatch):
    """The card PEFT's own ``save_pretrained`` gets names the packaged alias with ``prepare``, never a Hub id."""
    cache = tmp_path / "peft-masm-cache"
    save_packaged_like_clip(cache)
    monkeypatch.setenv("PEFT_MASM_CACHE", str(cache))
    model = build_detector("clip-vit-b16", MASMConfig(num_subspaces=1, subspace_rank=1))
    model.save_pretrained(tmp_path / "adapter")
    code = card_code(tmp_path / "adapter" / "README.md")
    assert 'prepare("clip-vit-b16")' in code
