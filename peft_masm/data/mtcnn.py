"""A small MTCNN (Zhang et al., 2016) in plain torch that loads facenet-pytorch's pnet/rnet/onet weights.

facenet-pytorch itself imports torchvision, which this package does not depend on, so only its three ``.pt``
state dicts are used (fetched from its pinned PyPI wheel, ``peft_masm.assets``); NMS and resampling are
reimplemented in numpy/torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

__all__ = ["MTCNN", "PNet", "RNet", "ONet"]


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.softmax4_1 = nn.Conv2d(32, 2, 1), nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.softmax5_1 = nn.Linear(128, 2), nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, mode: str = "union") -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        denom = np.minimum(area[i], area[order[1:]]) if mode == "min" else area[i] + area[order[1:]] - inter
        order = order[1:][inter / denom <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.copy()
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _square(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Crop (1-based, clipped) boxes from a normalised (H,W,3) float array and resize each to size x size (area)."""
    h, w, _ = img.shape
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    for i, (x1, y1, x2, y2) in enumerate(b):
        x1, y1 = max(x1, 1), max(y1, 1)
        x2, y2 = min(x2, w), min(y2, h)
        if x2 >= x1 and y2 >= y1:
            out[i] = cv2.resize(img[y1 - 1 : y2, x1 - 1 : x2], (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class MTCNN:
    """Face boxes + 5 landmarks (eyes, nose, mouth corners) with the classic three-stage cascade."""

    def __init__(
        self,
        weights_dir: str | os.PathLike,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ):
        d = Path(weights_dir)
        # Built on the meta device and filled from the weights (assign=True): no random initialisation,
        # so creating a detector never consumes torch's global RNG (a seeded run would otherwise see
        # other random numbers on the run that builds the face corpus than on the runs that read it).
        with torch.device("meta"):
            self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            state = torch.load(d / name, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True, assign=True)
            net.eval()
        self.min_face_size, self.thresholds, self.factor = min_face_size, thresholds, factor

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB uint8 (H,W,3) -> boxes (N,4) x1y1x2y2, scores (N,), landmarks (N,5,2) in pixels."""
        torch.set_flush_denormal(True)  # PReLU on denormals is several times slower on CPU
        try:
            with torch.inference_mode():
                return self._detect(np.ascontiguousarray(image))
        finally:
            torch.set_flush_denormal(False)  # torch's default

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB uint8 (H,W,3) -> boxes (N,4) x1y1x2y2, scores (N,), landmarks (N,5,2) in pixels."""
        h, w = image.shape[:2]
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales: list[float] = []
        while minl >= 12:
            scales.append(m * self.factor ** len(scales))
            minl *= self.factor
        norm = (image.astype(np.float32) - 127.5) * 0.0078125
        cands = []
        for s in scales:
            hs, ws = int(h * s + 1), int(w * s + 1)
            x = torch.from_numpy(cv2.resize(norm, (ws, hs), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[
                None
            ]
            reg, prob = self.pnet(x)
            p = prob[0, 1].numpy()
            ys, xs = np.nonzero(p >= self.thresholds[0])
            if len(ys) == 0:
                continue
            r = reg[0].numpy()[:, ys, xs].T
            q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / s)
            q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / s)
            b = np.concatenate([q1, q2, p[ys, xs][:, None], r], 1)
            cands.append(b[_nms(b[:, :4], b[:, 4], 0.5)])
        if not cands:
            return empty
        b = np.concatenate(cands)
        b = b[_nms(b[:, :4], b[:, 4], 0.7)]
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        boxes = np.stack(
            [
                b[:, 0] + b[:, 5] * bw,
                b[:, 1] + b[:, 6] * bh,
                b[:, 2] + b[:, 7] * bw,
                b[:, 3] + b[:, 8] * bh,
                b[:, 4],
            ],
            1,
        )
        boxes = _square(boxes)
        # stage 2
        reg, prob = self.rnet(_crops(norm, boxes, 24))
        score = prob[:, 1].numpy()
        ok = score > self.thresholds[1]
        boxes = np.concatenate([boxes[ok, :4], score[ok, None]], 1)
        reg = reg.numpy()[ok]
        keep = _nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_bbreg(boxes[keep], reg[keep]))
        if len(boxes) == 0:
            return empty
        # stage 3
        reg, pts, prob = self.onet(_crops(norm, boxes, 48))
        score = prob[:, 1].numpy()
        ok = score > self.thresholds[2]
        boxes, reg, pts = boxes[ok], reg.numpy()[ok], pts.numpy()[ok]
        boxes[:, 4] = score[ok]
        wi, hi = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        lx = wi[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        ly = hi[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1
        boxes = _bbreg(boxes, reg)
        keep = _nms(boxes[:, :4], boxes[:, 4], 0.7, mode="min")
        lm = np.stack([lx, ly], -1)[keep]
        return boxes[keep, :4].astype(np.float32), boxes[keep, 4].astype(np.float32), lm.astype(np.float32)
