"""masm-detect: images, folders and videos in; fake probability per image or video out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from recipe_fixtures import make_image_folder, save_tiny_clip  # noqa: E402

from peft_masm import MASMConfig  # noqa: E402
from peft_masm.cli import collect_inputs, main  # noqa: E402
from peft_masm.detector import build_detector  # noqa: E402


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_detector(
        str(save_tiny_clip(root / "clip")), MASMConfig(num_subspaces=1, subspace_rank=1, layer_mask="none")
    )
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def _video(path: Path, frames: int = 12) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (48, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    writer.release()
    return path


def test_json_output_for_images_folders_and_videos(adapter, tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", {"test": 2})
    video = _video(tmp_path / "clip.mp4")
    single = data / "test" / "real" / "real_0.png"
    rc = main(
        [
            "--adapter",
            str(adapter),
            "--json",
            "--face-detector",
            "none",
            "--frames",
            "4",
            str(single),
            str(data / "test" / "fake"),
            str(video),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["type"] for r in out] == ["image", "image", "image", "video"]
    assert out[-1]["frames"] == 4 and out[0]["frames"] == 1
    for r in out:
        assert 0.0 <= r["fake_probability"] <= 1.0
        assert r["faces_found"] == 0  # face detection switched off


def test_table_output(adapter, tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", {"test": 1})
    assert main(["--adapter", str(adapter), "--face-detector", "none", str(data / "test")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["path", "type"] and len(out) == 3
    assert out[1].split()[-1] in ("real", "fake")


def test_bad_inputs_fail_clearly(adapter, tmp_path, capsys):
    assert main(["--adapter", str(adapter), str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["--adapter", str(adapter), str(tmp_path / "notes.txt")]) == 2
    assert "not an image or video" in capsys.readouterr().err
    image = make_image_folder(tmp_path / "imgs", {"test": 1}) / "test" / "real" / "real_0.png"
    assert main(["--adapter", str(tmp_path), str(image)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images or videos"):
        collect_inputs([str(tmp_path / "empty")])
