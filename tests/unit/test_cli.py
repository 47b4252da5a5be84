"""masm-detect: images, folders and videos in; fake probability per image or video out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from recipe_fixtures import make_image_folder, save_tiny_clip  # noqa: E402

from peft_masm import MASMConfig  # noqa: E402
from peft_masm.cli import collect_inputs, main  # noqa: E402
from peft_masm.data.io import MIN_IMAGE_SIZE  # noqa: E402
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


def test_unreadable_file_is_reported_and_the_rest_scored(adapter, tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", {"test": 1})
    broken = data / "test" / "real" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    args = [
        "--adapter",
        str(adapter),
        "--face-detector",
        "none",
        str(data / "test"),
        str(tmp_path / "bad.mp4"),
    ]
    assert main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 4
    by_path = {Path(r["path"]).name: r for r in out}
    assert (
        "cannot decode" in by_path["broken.png"]["error"]
        and by_path["broken.png"]["fake_probability"] is None
    )
    assert by_path["bad.mp4"]["error"] and by_path["bad.mp4"]["type"] == "video"
    for name in ("real_0.png", "fake_0.png"):
        assert by_path[name]["error"] is None and 0.0 <= by_path[name]["fake_probability"] <= 1.0
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 5  # header + one line per input, failures included
    assert [ln for ln in lines if "broken.png" in ln][0].split()[-1] != "real"
    assert "error" in [ln for ln in lines if "broken.png" in ln][0]
    assert "2 of 4 inputs could not be scored" in captured.err


def test_no_face_found_is_said(adapter, tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", {"test": 1})  # colour gradients: no face
    image = data / "test" / "real" / "real_0.png"
    assert main(["--adapter", str(adapter), "--face-detector", "lbp", "--json", str(image)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["faces_found"] == 0 and row["face_detection"] is True
    assert "no face found" in row["warning"]
    assert main(["--adapter", str(adapter), "--face-detector", "lbp", str(image)]) == 0
    assert "no face found" in capsys.readouterr().out.splitlines()[1]
    assert main(["--adapter", str(adapter), "--face-detector", "none", "--json", str(image)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["face_detection"] is False and row["warning"] is None  # asked to score the whole image


@pytest.fixture(scope="module")
def headless_adapter(tmp_path_factory):
    """An adapter on a backbone saved without a head (as every real backbone is): the load report names it."""
    from transformers import CLIPForImageClassification

    root = tmp_path_factory.mktemp("cli-headless")
    clip = save_tiny_clip(root / "clip")
    body = CLIPForImageClassification.from_pretrained(clip)
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("classifier.")}
    body.save_pretrained(clip, state_dict=state)
    model = build_detector(str(clip), MASMConfig(num_subspaces=1, subspace_rank=1, layer_mask="none"))
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def test_load_report_of_the_adapter_head_is_not_printed(headless_adapter, tmp_path, capfd):
    import logging

    image = make_image_folder(tmp_path / "imgs", {"test": 1}) / "test" / "real" / "real_0.png"

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("transformers.modeling_utils")
    filters_before = list(logger.filters)
    seen = Records()
    logging.getLogger("transformers").addHandler(seen)  # sees what transformers' own handler would print
    try:
        assert main(["--adapter", str(headless_adapter), "--face-detector", "none", str(image)]) == 0
        from peft_masm.detector import load_base_classifier

        load_base_classifier(str(headless_adapter.parent / "clip"))  # outside masm-detect: still reported
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err.split("Loading weights")[0]
    assert sum("LOAD REPORT" in m for m in seen.messages) == 1, seen.messages
    assert logger.filters == filters_before  # restored afterwards


def test_only_the_expected_head_report_is_dropped():
    from peft_masm.cli import _expected_head_report

    head = (
        "\x1b[1mCLIPForImageClassification LOAD REPORT\x1b[0m from: x\n"
        "Key               | Status  | \n------------------+---------+-\n"
        "classifier.weight | MISSING | \nclassifier.bias   | MISSING | \n\nNotes:\n- MISSING:\tConsider training."
    )
    assert _expected_head_report(head, {"classifier"})
    assert not _expected_head_report(head, {"score"})
    other = head.replace("classifier.bias   | MISSING", "vision_model.post_layernorm.weight | MISSING")
    assert not _expected_head_report(other, {"classifier"})
    unexpected = head + "\nvision_model.extra | UNEXPECTED | "
    assert not _expected_head_report(unexpected, {"classifier"})
    assert not _expected_head_report("some other warning", {"classifier"})


@pytest.mark.parametrize("value", ["2", "-0.1", "1.5", "nan", "high"])
def test_threshold_outside_0_1_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--adapter", "unused", "--threshold", value, "photo.jpg"])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("masm-detect: error: argument --threshold:") and "between 0 and 1" in last
    assert f"'{value}'" in last


def test_threshold_bounds_are_accepted(adapter, tmp_path, capsys):
    image = make_image_folder(tmp_path / "imgs", {"test": 1}) / "test" / "real" / "real_0.png"
    for value, verdict in (("0", "fake"), ("1", "real")):
        assert (
            main(["--adapter", str(adapter), "--face-detector", "none", "--threshold", value, str(image)])
            == 0
        )
        assert capsys.readouterr().out.splitlines()[1].split()[-1] == verdict


def test_files_a_folder_holds_that_are_not_images_or_videos_are_listed(adapter, tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", {"test": 1}) / "test"
    Image.new("RGB", (32, 32)).save(data / "real" / "anim.gif")
    (data / "notes.txt").write_text("hi")
    assert main(["--adapter", str(adapter), "--face-detector", "none", "--json", str(data)]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2
    skipped = [ln for ln in captured.err.splitlines() if ln.startswith("masm-detect: skipped")]
    assert len(skipped) == 2, captured.err
    by_name = {Path(ln.split()[2].rstrip(":")).name: ln for ln in skipped}
    assert set(by_name) == {"anim.gif", "notes.txt"}
    assert "not an image or video file" in by_name["anim.gif"] and ".png" in by_name["anim.gif"]
    from peft_masm.cli import scan_inputs

    items, left = scan_inputs([str(data)])
    assert len(items) == 2 and sorted(p.name for p, _ in left) == ["anim.gif", "notes.txt"]


def test_image_below_the_minimum_size_is_an_error_row(adapter, tmp_path, capsys):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (120, 80, 60)).save(tiny)
    good = make_image_folder(tmp_path / "imgs", {"test": 1}) / "test" / "real" / "real_0.png"
    args = ["--adapter", str(adapter), "--face-detector", "lbp", str(tiny), str(good)]
    assert main([*args, "--json"]) == 1
    tiny_row, good_row = json.loads(capsys.readouterr().out)
    assert tiny_row["fake_probability"] is None and tiny_row["warning"] is None
    assert (
        f"1x1 px, below the minimum usable size of {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} px" in tiny_row["error"]
    )
    assert good_row["error"] is None and 0.0 <= good_row["fake_probability"] <= 1.0
    assert main(args) == 1
    line = capsys.readouterr().out.splitlines()[1]
    assert "error:" in line and "1x1 px" in line and not line.rstrip().endswith(("real", "fake"))
