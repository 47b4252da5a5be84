"""Dataset loaders: folders, DeepfakeBench JSON, CSV/JSONL manifests and video files.

Each loader builds a light index (``path``, ``frame``, ``label``, ``video_id`` ...) and decodes
lazily: ``ds[i]["image"]`` is decoded on access through ``with_transform``; ``streaming=True``
gives an ``IterableDataset`` that decodes while iterating. Whole-column access (``ds["label"]``)
runs the decoder too; read metadata without decoding with ``ds.with_format(None)["label"]``.
Labels: 0 real, 1 fake.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

import datasets
from PIL import Image

from .io import (
    DataError,
    LoadReport,
    UnusableFileError,
    check_image_size,
    check_on_error,
    probe_image,
    read_image,
)
from .video import evenly_spaced_indices, read_video_frame, video_frame_count

__all__ = [
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "DecodeRows",
    "load_folder",
    "load_deepfakebench",
    "load_manifest",
    "load_videos",
    "natural_key",
]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
_DEFAULT_LABELS = {"real": 0, "fake": 1, "0": 0, "1": 1}
_COMPRESSIONS = {"raw", "c23", "c40"}
_SHOWN_REASONS = 10  # skipped files named in the warning; LoadReport.reasons keeps the rest


def natural_key(s: str) -> list[Any]:
    """Sort key that orders ``frame_9`` before ``frame_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", os.fspath(s))]


class DecodeRows:
    """Batch transform: decode ``path``/``frame`` into an RGB PIL ``image`` column.

    Picklable (``datasets`` fingerprints and forks it). With ``on_error="skip"`` undecodable rows
    are dropped, which only an ``IterableDataset`` map allows; map-style datasets validate up front.
    """

    def __init__(self, on_error: str = "raise", report: LoadReport | None = None):
        check_on_error(on_error)
        self.on_error = on_error
        self.report = report

    def decode_one(self, path: str, frame: int) -> Image.Image:
        arr = read_video_frame(path, frame) if frame >= 0 else read_image(path)
        check_image_size(arr.shape[1], arr.shape[0], path, "image" if frame < 0 else f"frame {frame}")
        return Image.fromarray(arr)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["path"])
        keep, images = [], []
        for i in range(n):
            try:
                images.append(self.decode_one(batch["path"][i], int(batch["frame"][i])))
                keep.append(i)
            except DataError as exc:
                if self.on_error == "raise":
                    raise
                if self.report is not None:
                    self.report.skip(str(exc))
        out = {k: [v[i] for i in keep] for k, v in batch.items()}
        out["image"] = images
        return out


def _row(path: str, label: int, video_id: str, frame: int = -1, **extra: Any) -> dict[str, Any]:
    row = {"path": path, "frame": frame, "label": int(label), "video_id": video_id}
    row.update({k: ("" if v is None else str(v)) for k, v in extra.items()})
    return row


def _expand_video(
    path: str, label: int, video_id: str, num_frames: int, on_error: str, report: LoadReport, **extra: Any
) -> list[dict[str, Any]]:
    try:
        total = video_frame_count(path)
    except DataError as exc:
        if on_error == "raise":
            raise
        report.skip(str(exc))
        return []
    return [_row(path, label, video_id, i, **extra) for i in evenly_spaced_indices(total, num_frames)]


def _finish(
    rows: list[dict[str, Any]],
    on_error: str,
    report: LoadReport | None,
    streaming: bool,
    what: str,
    validate: bool | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Check every listed file, then build the lazy dataset.

    Images are checked by :func:`probe_image` (a fast pass: headers, sizes, truncation), so that a
    missing, unreadable or too small one is found here, before any training step: it raises
    :class:`UnusableFileError` naming the file and ``on_error="skip"`` (``"raise"``), or is skipped,
    counted in ``report`` and listed in a warning (``"skip"``). Streaming datasets check that files
    exist and decode (and skip) as they go.
    """
    report = report if report is not None else LoadReport()
    validate = not streaming if validate is None else validate
    kept = []
    for r in rows:
        try:
            if not os.path.exists(r["path"]):
                raise UnusableFileError(r["path"], f"file not found (listed by {what})")
            if validate and r["frame"] < 0:
                probe_image(r["path"])
        except UnusableFileError as exc:
            if on_error == "raise":
                hint = "; replace or remove it, or pass on_error='skip' to skip unusable files"
                raise UnusableFileError(exc.path, exc.problem, hint) from None
            report.skip(str(exc))
            continue
        kept.append(r)
    if not kept:
        raise DataError(f"{what}: no usable samples ({report.skipped} skipped: {report.reasons[:3]})")
    report.loaded = len(kept)
    if report.skipped:
        shown = report.reasons[:_SHOWN_REASONS]
        more = report.skipped - len(shown)
        tail = f"; and {more} more (LoadReport.reasons)" if more > 0 else ""
        warnings.warn(
            f"{what}: {report.summary()} (on_error='skip'); skipped: {'; '.join(shown)}{tail}", stacklevel=3
        )
    ds = datasets.Dataset.from_list(kept)
    decode = DecodeRows(on_error=on_error, report=report)
    if streaming:
        return ds.to_iterable_dataset().map(decode, batched=True, batch_size=16)
    return ds.with_transform(decode)


def _class_dirs(root: Path) -> list[tuple[Path, int]]:
    found = [(root / name, lab) for name, lab in (("real", 0), ("fake", 1)) if (root / name).is_dir()]
    if not found:
        raise DataError(
            f"{root}: expected sub-folders 'real/' and/or 'fake/' (optionally under a split "
            "folder such as train/real); none found"
        )
    return found


def load_folder(
    root: str | os.PathLike,
    split: str | None = None,
    num_frames: int = 8,
    on_error: str = "raise",
    report: LoadReport | None = None,
    streaming: bool = False,
):
    """Images and videos under ``root/real`` and ``root/fake`` (or ``root/<split>/{real,fake}``).

    ``video_id`` is the sub-folder below the class folder (frames of one video) or the file stem.
    Video files contribute ``num_frames`` evenly spaced frames.
    """
    check_on_error(on_error)
    report = report if report is not None else LoadReport()
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise DataError(f"{base}: folder not found")
    rows: list[dict[str, Any]] = []
    for cdir, label in _class_dirs(base):
        files = sorted((p for p in cdir.rglob("*") if p.is_file()), key=lambda p: natural_key(str(p)))
        for p in files:
            ext = p.suffix.lower()
            rel = p.relative_to(cdir)
            vid = f"{cdir.name}/{rel.parent.as_posix()}" if len(rel.parts) > 1 else f"{cdir.name}/{p.stem}"
            if ext in IMAGE_EXTS:
                rows.append(_row(str(p), label, vid, split=split or ""))
            elif ext in VIDEO_EXTS:
                rows += _expand_video(str(p), label, vid, num_frames, on_error, report, split=split or "")
    return _finish(rows, on_error, report, streaming, str(base))


def _read_label_dict(label_dict: Mapping[str, int] | str | os.PathLike | None) -> dict[str, int]:
    if label_dict is None:
        return dict(_DEFAULT_LABELS)
    if isinstance(label_dict, Mapping):
        return {str(k): int(v) for k, v in label_dict.items()}
    p = Path(label_dict)
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else __import__("yaml").safe_load(text)
    except Exception as exc:
        raise DataError(f"{p}: cannot read the label dictionary ({exc})") from exc
    if isinstance(data, Mapping) and "label_dict" in data:
        data = data["label_dict"]
    if not isinstance(data, Mapping):
        raise DataError(f"{p}: the label dictionary must map label names to 0/1")
    return {str(k): int(v) for k, v in data.items()}


def _map_label(name: Any, labels: dict[str, int], where: str) -> int:
    key = str(name)
    if key not in labels:
        raise DataError(
            f"{where}: label {key!r} is not in the label dictionary {sorted(labels)}; "
            "add it to label_dict (0 real, 1 fake)"
        )
    value = labels[key]
    if value not in (0, 1):
        raise DataError(f"{where}: label {key!r} maps to {value}; only 0 (real) and 1 (fake) are allowed")
    return value


def _videos_in(node: Any, split: str, compression: str | None, where: str) -> Mapping[str, Any]:
    """Descend split -> [compression] and return {video name: {label, frames}}."""
    if not isinstance(node, Mapping) or split not in node:
        keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        raise DataError(f"{where}: expected split {split!r} under this label, found {keys}")
    node = node[split]
    if isinstance(node, Mapping) and node and set(node) <= _COMPRESSIONS:
        comp = compression or "c23"
        if comp not in node:
            raise DataError(f"{where}/{split}: compression {comp!r} not present (have {sorted(node)})")
        node = node[comp]
    if not isinstance(node, Mapping):
        raise DataError(
            f"{where}/{split}: expected a mapping of video name -> {{label, frames}}, "
            f"found {type(node).__name__}"
        )
    return node


class _FrameResolver:
    """Resolve a DeepfakeBench JSON's relative frame paths (``/`` or Windows ``\\`` separators).

    With ``data_root`` they resolve against it. Without, against the first of the JSON's folder and
    the folders above it under which the path exists: DeepfakeBench writes paths such as
    ``./datasets/rgb/FaceForensics++/...`` relative to its own root, above ``preprocessing/dataset_json``.
    """

    def __init__(self, json_path: Path, data_root: str | os.PathLike | None, on_error: str):
        self.json_path = json_path
        self.base = Path(data_root) if data_root is not None else None
        self.explicit = data_root is not None
        self.on_error = on_error

    def __call__(self, frame: str) -> str:
        f = frame.replace("\\", "/")
        if os.path.isabs(f) or PureWindowsPath(frame).drive:
            return f
        if self.base is None:
            start = self.json_path.parent
            found = next((d for d in (start, *start.parents) if (d / f).exists()), None)
            if found is None:
                tried = os.path.normpath(start / f)
                if self.on_error == "raise":
                    raise DataError(
                        f"{self.json_path}: frame {frame!r} not found at {tried} nor under any folder "
                        "above it; pass data_root=<the folder the JSON's paths are relative to, "
                        "e.g. the DeepfakeBench root>"
                    )
                return tried
            self.base = found
        path = os.path.normpath(self.base / f)
        if self.explicit and self.on_error == "raise" and not os.path.exists(path):
            raise DataError(
                f"{self.json_path}: frame {frame!r} not found at {path} (data_root={self.base}); "
                "pass data_root=<the folder the JSON's paths are relative to, e.g. the DeepfakeBench root>"
            )
        return path


def load_deepfakebench(
    json_path: str | os.PathLike,
    label_dict: Mapping[str, int] | str | None = None,
    split: str = "test",
    compression: str | None = "c23",
    data_root: str | os.PathLike | None = None,
    frames_per_video: int | None = None,
    dataset_name: str | None = None,
    on_error: str = "raise",
    report: LoadReport | None = None,
    streaming: bool = False,
):
    """A DeepfakeBench dataset JSON: dataset -> label name -> split -> [compression] -> video -> entry.

    ``label_dict`` maps label names (e.g. ``FF-real``, ``FF-DF``) to 0/1 (a dict, or a JSON/YAML file,
    optionally with a top-level ``label_dict`` key). ``compression`` applies to FF++-family files
    only. Frames are sorted numerically; ``frames_per_video`` keeps that many, evenly spaced.
    ``video_id`` is ``<label name>/<video>`` (e.g. ``FF-DF/006_007``): FF++ reuses video names under
    every manipulation. Relative frame paths (``/`` or ``\\``) resolve against ``data_root``; by
    default against the JSON's folder or the nearest folder above it where they exist (DeepfakeBench
    writes them relative to its root).
    """
    check_on_error(on_error)
    report = report if report is not None else LoadReport()
    jp = Path(json_path)
    try:
        data = json.loads(jp.read_text())
    except FileNotFoundError:
        raise DataError(f"{jp}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{jp}: not valid JSON ({exc})") from exc
    labels = _read_label_dict(label_dict)
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{jp}: top level must be {{dataset name: {{label name: {{split: ...}}}}}}")
    if dataset_name is None:
        if len(data) != 1:
            raise DataError(f"{jp}: holds several datasets {sorted(data)}; pass dataset_name")
        dataset_name = next(iter(data))
    if dataset_name not in data:
        raise DataError(f"{jp}: dataset {dataset_name!r} not found (have {sorted(data)})")
    resolve = _FrameResolver(jp, data_root, on_error)
    by_label = data[dataset_name]
    if not isinstance(by_label, Mapping):
        raise DataError(
            f"{jp}: {dataset_name!r} must map label names to splits, found {type(by_label).__name__}"
        )
    rows: list[dict[str, Any]] = []
    for label_name, node in by_label.items():
        where = f"{jp}: {dataset_name}/{label_name}"
        try:
            label_name_value = _map_label(label_name, labels, where)
        except DataError:
            if on_error == "raise":
                raise
            report.skip(f"{where}: label not in label dictionary")
            continue
        for video, entry in _videos_in(node, split, compression, where).items():
            vwhere = f"{where}/{split}/{video}"
            if not isinstance(entry, Mapping) or "frames" not in entry:
                raise DataError(
                    f"{jp}: {vwhere}: expected {{'label': ..., 'frames': [...]}}, "
                    f"found {type(entry).__name__} (wrong nesting?)"
                )
            lab = (
                _map_label(entry.get("label", label_name), labels, f"{jp}: {vwhere}")
                if "label" in entry
                else label_name_value
            )
            frames = sorted((str(f) for f in entry["frames"]), key=natural_key)
            if frames_per_video:
                frames = [frames[i] for i in evenly_spaced_indices(len(frames), frames_per_video)]
            video_id = f"{label_name}/{video}"
            for f in frames:
                path = resolve(f)
                if Path(path).suffix.lower() in VIDEO_EXTS:
                    rows += _expand_video(
                        path,
                        lab,
                        video_id,
                        frames_per_video or 8,
                        on_error,
                        report,
                        source=label_name,
                        split=split,
                    )
                else:
                    rows.append(_row(path, lab, video_id, source=label_name, split=split))
    return _finish(rows, on_error, report, streaming, str(jp))


def _manifest_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: invalid JSON line ({exc})") from exc
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(
                    f"{path}: a manifest needs the columns 'path' and 'label' "
                    f"(optional video_id, source, split); found {reader.fieldnames}"
                )
            for n, rec in enumerate(reader, 2):
                yield n, rec


def load_manifest(
    path: str | os.PathLike,
    split: str | None = None,
    label_dict: Mapping[str, int] | str | None = None,
    base_dir: str | os.PathLike | None = None,
    num_frames: int = 8,
    on_error: str = "raise",
    report: LoadReport | None = None,
    streaming: bool = False,
):
    """A CSV or JSONL manifest with ``path``, ``label`` (0/1 or a name) and optional ``video_id``,
    ``source``, ``split``. Relative paths resolve against ``base_dir`` (default: the manifest's folder).
    """
    check_on_error(on_error)
    report = report if report is not None else LoadReport()
    mp = Path(path)
    if not mp.is_file():
        raise DataError(f"{mp}: manifest not found")
    labels = _read_label_dict(label_dict)
    root = Path(base_dir) if base_dir is not None else mp.parent
    rows: list[dict[str, Any]] = []
    for n, rec in _manifest_records(mp):
        where = f"{mp}:{n}"
        if not isinstance(rec, Mapping) or "path" not in rec or "label" not in rec:
            raise DataError(f"{where}: each record needs 'path' and 'label'")
        if split is not None and rec.get("split") not in (None, "", split):
            continue
        try:
            lab = _map_label(rec["label"], labels, where)
        except DataError:
            if on_error == "raise":
                raise
            report.skip(f"{where}: label {rec['label']!r} not in label dictionary")
            continue
        p = str(rec["path"])
        p = p if os.path.isabs(p) else str(root / p)
        vid = str(rec.get("video_id") or Path(p).stem)
        extra = {"source": rec.get("source", ""), "split": rec.get("split", "")}
        if Path(p).suffix.lower() in VIDEO_EXTS:
            rows += _expand_video(p, lab, vid, num_frames, on_error, report, **extra)
        else:
            rows.append(_row(p, lab, vid, **extra))
    return _finish(rows, on_error, report, streaming, str(mp))


def load_videos(
    videos: Iterable[tuple[str | os.PathLike, int]] | str | os.PathLike,
    num_frames: int = 8,
    on_error: str = "raise",
    report: LoadReport | None = None,
    streaming: bool = False,
):
    """Video files -> ``num_frames`` evenly spaced frames each (over the whole video).

    ``videos`` is a list of ``(path, label)`` pairs or a folder with ``real/`` and ``fake/``.
    """
    check_on_error(on_error)
    if isinstance(videos, (str, os.PathLike)):
        return load_folder(
            videos, num_frames=num_frames, on_error=on_error, report=report, streaming=streaming
        )
    report = report if report is not None else LoadReport()
    rows: list[dict[str, Any]] = []
    for p, lab in videos:
        rows += _expand_video(os.fspath(p), int(lab), Path(p).stem, num_frames, on_error, report)
    return _finish(rows, on_error, report, streaming, "video list")
