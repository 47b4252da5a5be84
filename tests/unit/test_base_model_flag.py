"""``--base_model`` for adapters whose config names no base (issue 26 item 8).

``MASMDetector.from_pretrained`` says "pass base_model=..." for such an adapter; ``masm-detect`` had no such flag and
``recipes/evaluate_detector.py`` printed a traceback. The adapter here is made as a user makes one on a model
built from a config (``base_model_name_or_path`` stays empty); the base's weights are saved to a folder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from recipe_fixtures import RECIPES, make_image_folder
from tiny_backbones import TINY_CLIP_VISION

from peft_masm import MASMConfig
from peft_masm.cli import main as masm_detect


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_detector", RECIPES / "evaluate_detector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def unnamed_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(adapter, base folder)``: a MASM detector adapter whose config names no base model."""
    from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessor

    root = tmp_path_factory.mktemp("unnamed")
    torch.manual_seed(0)
    base = CLIPForImageClassification(
        CLIPConfig(vision_config=TINY_CLIP_VISION, num_labels=2)
    )  # built from a config
    base.save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "base"
    )
    config = MASMConfig(
        num_subspaces=1, subspace_rank=1, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    get_peft_model(base, config).save_pretrained(root / "adapter")
    assert not json.loads((root / "adapter" / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    return root / "adapter", root / "base"


def test_masm_detect_takes_base_model(unnamed_base, tmp_path, capsys):
    adapter, base = unnamed_base
    image = make_image_folder(tmp_path / "images", {"test": 1}) / "test" / "fake" / "fake_0.png"
    args = ["--adapter", str(adapter), "--face-detector", "none", "--json", str(image)]
    assert masm_detect(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no base model" in err[0] and "--base_model" in err[0], err

    assert masm_detect(["--base_model", str(base), *args]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 1 and 0.0 <= results[0]["fake_probability"] <= 1.0


def test_evaluate_detector_takes_base_model(unnamed_base, tmp_path, capsys):
    adapter, base = unnamed_base
    images = make_image_folder(tmp_path / "images", {"test": 3})
    evaluate = _evaluate_main()
    out = tmp_path / "eval"
    args = ["--adapter", str(adapter), "--test", f"mine=folder:{images}", "--output_dir", str(out)]
    args += ["--n_bootstrap", "0"]
    assert evaluate(args) == 2  # was a traceback (an uncaught ValueError)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base_model" in err[0], err

    assert evaluate([*args, "--base_model", str(base)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "mine" in json.dumps(results)
