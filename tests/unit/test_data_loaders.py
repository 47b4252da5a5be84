"""Loaders: folders, DeepfakeBench JSON, manifests, videos; bad input; lazy decode; streaming."""

from __future__ import annotations

import json

import cv2
import datasets
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from peft_masm.data.io import MIN_IMAGE_SIZE, DataError, LoadReport, probe_image, read_image
from peft_masm.data.loaders import load_deepfakebench, load_folder, load_manifest, load_videos, natural_key
from peft_masm.data.processing import with_image_processor


def _img(path, value=100, size=(32, 40), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[0], size[1], 3), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_video(path, n=30, size=(48, 64)):
    """Each frame's pixel value encodes its index (i * 8), so decoded frames can be identified."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((size[0], size[1], 3), i * 8, np.uint8))
    w.release()
    return path


def test_natural_sort():
    assert sorted(["frame_10.png", "frame_9.png", "frame_100.png"], key=natural_key) == [
        "frame_9.png",
        "frame_10.png",
        "frame_100.png",
    ]


def test_folder_images_and_videos(tmp_path):
    _img(tmp_path / "train/real/a.png", 10)
    _img(tmp_path / "train/real/vid1/frame_2.png", 20)
    _img(tmp_path / "train/fake/b.jpg", 200)
    write_video(tmp_path / "train/fake/clip.avi", n=30)
    ds = load_folder(tmp_path, split="train", num_frames=3)
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == 2 + 1 + 3
    assert sorted(ds["label"]) == [0, 0, 1, 1, 1, 1]
    assert set(ds["video_id"]) == {"real/a", "real/vid1", "fake/b", "fake/clip"}
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    video_rows = [i for i, v in enumerate(ds["video_id"]) if v == "fake/clip"]
    assert [ds[i]["frame"] for i in video_rows] == [5, 15, 25]  # evenly spaced, not the first 3
    got = [int(np.asarray(ds[i]["image"]).mean() / 8 + 0.5) for i in video_rows]
    assert got == [5, 15, 25]


def test_folder_without_class_dirs_names_the_fix(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="real/"):
        load_folder(tmp_path)


def _dfb_tree(tmp_path, compression=True):
    frames = {}
    for label, video, val in (("FF-real", "000", 10), ("FF-DF", "000_003", 200)):
        paths = []
        for k in (10, 9, 1):
            p = _img(tmp_path / "frames" / label / video / f"frame_{k}.png", val + k)
            paths.append(str(p.relative_to(tmp_path)))
        frames[(label, video)] = paths

    def node(label, video):
        entry = {video: {"label": label, "frames": frames[(label, video)]}}
        return {"test": {"c23": entry, "c40": {}}} if compression else {"test": entry}

    data = {"FaceForensics++": {"FF-real": node("FF-real", "000"), "FF-DF": node("FF-DF", "000_003")}}
    jp = tmp_path / "FaceForensics++.json"
    jp.write_text(json.dumps(data))
    return jp


def test_deepfakebench_json(tmp_path):
    jp = _dfb_tree(tmp_path)
    ds = load_deepfakebench(jp, label_dict={"FF-real": 0, "FF-DF": 1}, split="test", compression="c23")
    assert len(ds) == 6
    assert ds["label"] == [0, 0, 0, 1, 1, 1]
    assert [p.rsplit("_", 1)[-1] for p in ds["path"][:3]] == ["1.png", "9.png", "10.png"]
    assert set(ds["video_id"]) == {"FF-real/000", "FF-DF/000_003"}
    assert np.asarray(ds[2]["image"])[0, 0, 0] == 20  # frame_10 of the real video
    sub = load_deepfakebench(jp, label_dict={"FF-real": 0, "FF-DF": 1}, frames_per_video=1)
    assert len(sub) == 2


def test_deepfakebench_json_without_compression_level(tmp_path):
    jp = _dfb_tree(tmp_path, compression=False)
    assert len(load_deepfakebench(jp, label_dict={"FF-real": 0, "FF-DF": 1})) == 6


def test_deepfakebench_label_dict_file_and_unknown_label(tmp_path):
    jp = _dfb_tree(tmp_path)
    ld = tmp_path / "labels.json"
    ld.write_text(json.dumps({"label_dict": {"FF-real": 0}}))
    with pytest.raises(DataError, match="FF-DF.*label dictionary"):
        load_deepfakebench(jp, label_dict=ld)
    report = LoadReport()
    ds = load_deepfakebench(jp, label_dict=ld, on_error="skip", report=report)
    assert len(ds) == 3 and report.skipped == 1


def test_deepfakebench_wrong_nesting_names_file(tmp_path):
    jp = tmp_path / "bad.json"
    jp.write_text(json.dumps({"Celeb-DF": {"CelebDFv1_real": {"test": ["a.png", "b.png"]}}}))
    with pytest.raises(DataError, match=r"bad\.json.*(video name|mapping)"):
        load_deepfakebench(jp, label_dict={"CelebDFv1_real": 0})
    jp.write_text(json.dumps({"Celeb-DF": {"CelebDFv1_real": {"train": {}}}}))
    with pytest.raises(DataError, match=r"bad\.json.*split 'test'"):
        load_deepfakebench(jp, label_dict={"CelebDFv1_real": 0})
    jp.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        load_deepfakebench(jp)


_FF_LABELS = {"FF-real": 0, "FF-DF": 1, "FF-F2F": 1, "FF-FS": 1, "FF-NT": 1}
_FF_METHODS = {"FF-DF": "Deepfakes", "FF-F2F": "Face2Face", "FF-FS": "FaceSwap", "FF-NT": "NeuralTextures"}


def _rearranged_ff(root, sep="/"):
    """A tiny FF++ tree and JSON laid out as DeepfakeBench's ``preprocessing/rearrange.py`` writes them.

    Frames under ``<root>/datasets/rgb/FaceForensics++/{original,manipulated}_sequences/.../c23/frames/
    <video>/NNN.png``; JSON ``<root>/preprocessing/dataset_json/FaceForensics++.json`` nested dataset ->
    label -> split -> compression -> video -> {label, frames[, masks]}, frame paths relative to ``<root>``
    (``./datasets/rgb/...``). Test split: real 006 and 007; each of the 4 methods fakes 006_007 and 007_006.
    """
    ff = "./datasets/rgb/FaceForensics++"
    tree = {}
    for label in _FF_LABELS:
        videos = ("006", "007") if label == "FF-real" else ("006_007", "007_006")
        base = (
            f"{ff}/original_sequences/youtube/c23/frames"
            if label == "FF-real"
            else f"{ff}/manipulated_sequences/{_FF_METHODS[label]}/c23/frames"
        )
        test = {}
        for v in videos:
            frames = [f"{base}/{v}/{k:03d}.png" for k in (0, 31, 15)]
            for f in frames:
                _img(root / f, 200 if _FF_LABELS[label] else 20)
            entry = {"label": label, "frames": [f.replace("/", sep) for f in frames]}
            if label != "FF-real":
                entry["masks"] = []
            test[v] = entry
        tree[label] = {split: {"c23": test if split == "test" else {}} for split in ("train", "val", "test")}
    jp = root / "preprocessing" / "dataset_json" / "FaceForensics++.json"
    jp.parent.mkdir(parents=True)
    jp.write_text(json.dumps({"FaceForensics++": tree}))
    return jp


def test_deepfakebench_ff_video_ids_are_unique_per_manipulation(tmp_path):
    jp = _rearranged_ff(tmp_path)
    ds = load_deepfakebench(jp, label_dict=_FF_LABELS, split="test", data_root=tmp_path)
    meta = ds.with_format(None)
    assert len(ds) == 30
    by_video = dict(zip(meta["video_id"], meta["label"]))
    assert len(by_video) == 10 and sum(by_video.values()) == 8
    assert "FF-DF/006_007" in by_video and "FF-NT/006_007" in by_video and by_video["FF-real/006"] == 0


def test_deepfakebench_paths_relative_to_the_deepfakebench_root(tmp_path):
    jp = _rearranged_ff(tmp_path)
    ds = load_deepfakebench(jp, label_dict=_FF_LABELS)  # data_root found by walking up from the JSON
    assert len(ds) == 30 and np.asarray(ds[0]["image"])[0, 0, 0] == 20
    assert ds.with_format(None)["path"][0].startswith(str(tmp_path / "datasets" / "rgb"))


def test_deepfakebench_windows_backslash_paths(tmp_path):
    jp = _rearranged_ff(tmp_path, sep="\\")
    assert len(load_deepfakebench(jp, label_dict=_FF_LABELS)) == 30


def test_deepfakebench_unresolvable_paths_name_data_root(tmp_path):
    jp = _rearranged_ff(tmp_path / "bench")
    moved = tmp_path / "elsewhere" / "FaceForensics++.json"
    moved.parent.mkdir()
    moved.write_text(jp.read_text())
    with pytest.raises(DataError, match=r"000\.png.*data_root") as info:
        load_deepfakebench(moved, label_dict=_FF_LABELS)
    assert "\n" not in str(info.value) and str(moved.parent) in str(info.value)
    with pytest.raises(DataError, match=r"data_root="):
        load_deepfakebench(jp, label_dict=_FF_LABELS, data_root=tmp_path)
    assert len(load_deepfakebench(moved, label_dict=_FF_LABELS, data_root=tmp_path / "bench")) == 30


def test_manifest_csv_and_jsonl(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(
        "path,label,video_id,source,split\na.png,real,v1,s,train\nb.png,1,v2,s,test\n"
    )
    ds = load_manifest(tmp_path / "m.csv")
    assert ds["label"] == [0, 1] and ds["video_id"] == ["v1", "v2"]
    assert load_manifest(tmp_path / "m.csv", split="test")["path"][0].endswith("b.png")
    lines = [{"path": "a.png", "label": 0}, {"path": "b.png", "label": "fake", "source": "x"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    ds = load_manifest(tmp_path / "m.jsonl")
    assert ds["label"] == [0, 1] and ds["video_id"] == ["a", "b"]
    (tmp_path / "bad.csv").write_text("file,y\na.png,0\n")
    with pytest.raises(DataError, match="bad.csv.*'path' and 'label'"):
        load_manifest(tmp_path / "bad.csv")
    (tmp_path / "lab.csv").write_text("path,label\na.png,maybe\n")
    with pytest.raises(DataError, match=r"lab\.csv:2.*'maybe'"):
        load_manifest(tmp_path / "lab.csv")


def test_bad_images_raise_or_skip(tmp_path):
    good = _img(tmp_path / "real/good.png")
    jpg = _img(tmp_path / "fake/trunc.jpg", size=(64, 64))
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    (tmp_path / "fake/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "m.csv").write_text(f"path,label\n{good},0\nmissing.png,1\n{jpg},1\n")
    with pytest.raises(DataError, match="missing.png: file not found"):
        load_manifest(tmp_path / "m.csv")
    report = LoadReport()
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = load_manifest(tmp_path / "m.csv", on_error="skip", report=report)
    assert len(ds) == 1 and report.skipped == 2 and report.loaded == 1
    # raise mode: found while the dataset is built (not when a training step decodes it), option named
    with pytest.raises(DataError, match=r"(corrupt\.png|trunc\.jpg): cannot decode.*on_error='skip'") as info:
        load_folder(tmp_path)
    assert "\n" not in str(info.value)
    report = LoadReport()
    with pytest.warns(UserWarning):
        ok = load_folder(tmp_path, on_error="skip", report=report)
    assert len(ok) == 1 and report.skipped == 2
    assert [ok[i]["image"].size for i in range(len(ok))] == [(40, 32)]


def test_probe_image_finds_unusable_files_without_a_full_decode(tmp_path):
    good = _img(tmp_path / "good.jpg", size=(40, 30))
    assert probe_image(good) == (30, 40)
    (tmp_path / "text.png").write_text("a text file named .png")
    png = _img(tmp_path / "cut.png", size=(64, 64))
    png.write_bytes(png.read_bytes()[:-40])
    rng = np.random.default_rng(0)
    jpg = tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-200])
    _img(tmp_path / "dot.png", size=(1, 1))
    _img(tmp_path / "strip.png", size=(MIN_IMAGE_SIZE - 1, 200))
    expected = {
        "text.png": "cannot decode image",
        "cut.png": "cannot decode image",
        "cut.jpg": "truncated",
        "dot.png": f"1x1 px, below the minimum usable size of {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} px",
        "strip.png": f"200x{MIN_IMAGE_SIZE - 1} px",
        "missing.png": "file not found",
    }
    for name, problem in expected.items():
        with pytest.raises(DataError, match=problem) as info:
            probe_image(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)), name
    _img(tmp_path / "smallest.png", size=(MIN_IMAGE_SIZE, MIN_IMAGE_SIZE))
    assert probe_image(tmp_path / "smallest.png") == (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)


def test_tiny_images_are_refused_or_skipped_with_a_reason(tmp_path):
    _img(tmp_path / "real/a.png")
    _img(tmp_path / "fake/b.png")
    _img(tmp_path / "fake/dot.png", size=(1, 1))
    with pytest.raises(DataError, match=r"dot\.png: image is 1x1 px.*on_error='skip'"):
        load_folder(tmp_path)
    report = LoadReport()
    with pytest.warns(UserWarning, match=r"skipped 1,.*dot\.png: image is 1x1 px"):
        ds = load_folder(tmp_path, on_error="skip", report=report)
    assert len(ds) == 2 and report.skipped == 1
    report = LoadReport()  # streaming decodes as it goes: the tiny image is dropped there
    rows = list(load_folder(tmp_path, streaming=True, on_error="skip", report=report))
    assert len(rows) == 2 and report.skipped == 1 and "1x1 px" in report.reasons[0]


def test_skip_warning_names_the_first_files_and_counts_the_rest(tmp_path):
    _img(tmp_path / "real/a.png")
    _img(tmp_path / "fake/b.png")
    for i in range(12):
        (tmp_path / f"fake/bad_{i:02d}.png").write_text("not an image")
    report = LoadReport()
    with pytest.warns(UserWarning) as record:
        load_folder(tmp_path, on_error="skip", report=report)
    (message,) = [str(w.message) for w in record]
    assert "skipped 12" in message and "and 2 more (LoadReport.reasons)" in message
    assert "bad_09.png" in message and "bad_10.png" not in message and len(report.reasons) == 12


def test_odd_image_modes(tmp_path):
    _img(tmp_path / "grey.png", 50, mode="L")
    _img(tmp_path / "rgba.png", 60, mode="RGBA")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "deep.png")
    for name, value in (("grey.png", 50), ("rgba.png", 60), ("deep.png", 255)):
        arr = read_image(tmp_path / name)
        assert arr.shape == (*arr.shape[:2], 3) and arr.dtype == np.uint8
        assert int(arr[0, 0, 0]) == value, name


def test_videos_unreadable_and_short(tmp_path):
    v = write_video(tmp_path / "v.avi", n=4)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    ds = load_videos([(v, 1)], num_frames=8)  # shorter than requested: every frame once
    assert len(ds) == 4 and ds["label"] == [1] * 4
    with pytest.raises(DataError, match="broken.mp4"):
        load_videos([(tmp_path / "broken.mp4", 0)])
    report = LoadReport()
    with pytest.warns(UserWarning):
        ds = load_videos([(tmp_path / "broken.mp4", 0), (v, 1)], on_error="skip", report=report)
    assert report.skipped == 1 and len(ds) == 4


def test_streaming_and_image_processor(tmp_path):
    _img(tmp_path / "real/a.png", size=(20, 24))  # smaller than the model input
    _img(tmp_path / "fake/b.png", size=(300, 200), mode="L")
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ds = with_image_processor(load_folder(tmp_path), proc)
    row = ds[1]
    assert tuple(row["pixel_values"].shape) == (3, 32, 32) and row["labels"] == 1
    stream = load_folder(tmp_path, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    items = list(with_image_processor(stream, proc))
    assert [it["labels"] for it in items] == [1, 0] or [it["labels"] for it in items] == [0, 1]
    assert all(tuple(np.asarray(it["pixel_values"]).shape) == (3, 32, 32) for it in items)


def test_missing_faces_are_counted_not_fatal(tmp_path):
    _img(tmp_path / "real/a.png")
    _img(tmp_path / "fake/b.png")
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    report = LoadReport()
    ds = with_image_processor(load_folder(tmp_path), proc, face_cropper=lambda img: None, report=report)
    rows = [ds[i] for i in range(len(ds))]
    assert [r["face_found"] for r in rows] == [False, False] and report.faces_missing == 2
    stream = with_image_processor(
        load_folder(tmp_path, streaming=True),
        proc,
        face_cropper=lambda img: None,
        on_missing_face="skip",
        report=LoadReport(),
    )
    assert list(stream) == []
