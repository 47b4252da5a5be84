"""Adapters saved by earlier releases still load and give the outputs they gave then."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import ViTForImageClassification

import peft_masm  # noqa: F401  (registers MASM)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "masm_adapter_v0_1"


def test_adapter_written_by_0_1_0_loads_with_its_masks_and_outputs():
    base = ViTForImageClassification.from_pretrained(FIXTURE / "base").eval()
    model = PeftModel.from_pretrained(base, FIXTURE / "adapter").eval()
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        logits = model(pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-4)
    keep = model.base_model.layer_mask.current_keep()
    assert not all(keep) and any(keep)  # the dynamic mask's decisions came back with the adapter
    assert model.base_model.decompose() == 0  # loading ran no SVD
