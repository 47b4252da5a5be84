"""Apply a backbone's own HF image processor lazily: rows -> ``pixel_values`` + ``labels``."""

from __future__ import annotations

import os
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .io import LoadReport, to_rgb_uint8
from .loaders import DecodeRows

__all__ = ["ProcessRows", "collate", "with_image_processor"]


class ProcessRows:
    """Batch transform: decode (if the rows hold ``path``/``frame``), optionally crop the face, then
    run the image processor. ``on_missing_face`` is ``"full_frame"`` (use the whole image) or
    ``"skip"`` (drop the row; iterable datasets only, map-style ones fall back to the full frame and
    mark ``face_found=False``). Missing faces are counted in ``report.faces_missing``.
    """

    def __init__(
        self,
        processor: Any,
        face_cropper: Any = None,
        on_missing_face: str = "full_frame",
        report: LoadReport | None = None,
        drop_rows: bool = False,
    ):
        if on_missing_face not in ("full_frame", "skip"):
            raise ValueError(f"on_missing_face must be 'full_frame' or 'skip', got {on_missing_face!r}")
        self.processor = processor
        self.face_cropper = face_cropper
        self.on_missing_face = on_missing_face
        self.report = report if report is not None else LoadReport()
        self.drop_rows = drop_rows
        self.decode = DecodeRows()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "image" not in batch or batch["image"] is None:
            batch = self.decode(batch)
        n = len(batch["image"])
        images, keep, found = [], [], []
        for i in range(n):
            img = batch["image"][i]
            arr = to_rgb_uint8(np.asarray(img)) if not isinstance(img, np.ndarray) else to_rgb_uint8(img)
            ok = True
            if self.face_cropper is not None:
                crop = self.face_cropper(arr)
                if crop is None:
                    ok = False
                    self.report.faces_missing += 1
                    if self.on_missing_face == "skip" and self.drop_rows:
                        continue
                else:
                    arr = crop
            images.append(Image.fromarray(arr))
            keep.append(i)
            found.append(ok)
        # Iterable datasets keep input columns they are not given back, so every column is returned
        # (filtered); map-style transforms drop the decoded image and the raw label.
        dropped = () if self.drop_rows else ("image", "label", "labels")
        out = {k: [v[i] for i in keep] for k, v in batch.items() if k not in dropped}
        if images:
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixel_values = np.zeros((0,), dtype=np.float32)
        out["pixel_values"] = list(pixel_values)
        labels = batch.get("labels", batch.get("label"))
        if labels is not None:
            out["labels"] = [int(labels[i]) for i in keep]
        if self.face_cropper is not None:
            out["face_found"] = found
        return out


def with_image_processor(
    ds: datasets.Dataset | datasets.IterableDataset,
    processor: Any,
    face_cropper: Any = None,
    on_missing_face: str = "full_frame",
    report: LoadReport | None = None,
):
    """Return ``ds`` yielding ``pixel_values`` and ``labels`` made by ``processor``.

    ``processor`` is an image processor or a model directory / alias / Hub id, loaded with
    ``AutoImageProcessor``. ``face_cropper`` is a callable ``RGB uint8 -> crop or None``
    (see :class:`peft_masm.data.faces.FaceCropper`). Works lazily for map-style and streaming datasets.
    """
    if isinstance(processor, (str, os.PathLike)):
        from transformers import AutoImageProcessor

        from ..backbones import resolve

        processor = AutoImageProcessor.from_pretrained(resolve(os.fspath(processor)))
    if isinstance(ds, datasets.IterableDataset):
        fn = ProcessRows(processor, face_cropper, on_missing_face, report, drop_rows=True)
        return ds.map(fn, batched=True, batch_size=16)
    fn = ProcessRows(processor, face_cropper, on_missing_face, report, drop_rows=False)
    return ds.with_transform(fn)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` and ``labels``; keep ``video_id`` as a list of strings."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]),
        "labels": torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long),
        "video_id": [str(r.get("video_id", i)) for i, r in enumerate(rows)],
    }
