"""Time get_peft_model (incl. MASM's SVD) on a CLIP ViT-L/14-shaped vision model against a per-layer
torch.linalg.svd of the same 96 attention weights, in one run.

Run: ``.venv/bin/python benchmarks/injection_time.py`` (2 cores; about a minute).
"""

import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

import peft_masm

sys.path.insert(0, str(Path(__file__).parent))
from harness import MODELS  # noqa: E402

from peft_masm.recipe.methods import method_config  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(**MODELS["vit-l14"])
    # registry methods (recipes/methods/), on MASM's default targets
    for label, method in [("effort (K=1, k=1)", "effort"), ("default", "masm")]:
        model = CLIPVisionModel(config)
        start = time.perf_counter()
        peft_model = get_peft_model(model, method_config(method))
        seconds = time.perf_counter() - start
        layers = [m for m in peft_model.modules() if isinstance(m, peft_masm.MASMLayer)]
        print(f"{label}: get_peft_model incl. SVD of {len(layers)} matrices: {seconds:.2f} s", flush=True)
    start = time.perf_counter()
    for layer in layers:
        torch.linalg.svd(layer.get_base_layer().weight, full_matrices=False)
    seconds = time.perf_counter() - start
    print(
        f"baseline: per-layer torch.linalg.svd (float32, {torch.get_num_threads()} threads): {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
