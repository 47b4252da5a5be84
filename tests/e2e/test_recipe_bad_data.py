"""recipes/train.py on training data holding an unusable image: reported while the data is built, before
any training step, in one line that names the file and the option ``on_error: skip``."""

from __future__ import annotations

import subprocess

from recipe_fixtures import PYTHON, RECIPES, env, make_image_folder, save_tiny_clip, write_config


def test_unreadable_training_image_stops_the_run_before_any_step(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    (data / "train" / "real" / "notes.png").write_text("a text file named .png")
    cfg = write_config(tmp_path / "cfg.yaml", save_tiny_clip(tmp_path / "clip"), data, tmp_path / "out")
    result = subprocess.run(
        [PYTHON, str(RECIPES / "train.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ") and "notes.png: cannot decode image" in last and "on_error: skip" in last
    )
    assert "[3/4] data" in result.stdout and "[4/4] training" not in result.stdout
