"""Save, then load in a fresh process; LoRA export that loads without peft_masm."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from peft import get_peft_model
from peft.tuners.lora.conversion import save_as_lora

from peft_masm import MASMConfig

from .conftest import output_of, tiny_vit

LOADER = textwrap.dedent(
    """
    import sys, torch
    {imports}
    from peft import PeftModel
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32, patch_size=8)
    base = ViTForImageClassification(ViTConfig(**sizes, num_labels=2)).eval()
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    pixels = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(pixel_values=pixels).logits, sys.argv[3])
    """
)


def _run_fresh(tmp_path: Path, adapter: Path, pixels: torch.Tensor, imports: str) -> torch.Tensor:
    script = tmp_path / "load.py"
    script.write_text(LOADER.format(imports=imports))
    torch.save(pixels, tmp_path / "pixels.pt")
    subprocess.run(
        [sys.executable, str(script), str(adapter), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        check=True,
        capture_output=True,
    )
    return torch.load(tmp_path / "out.pt")


def _trained_adapter() -> torch.nn.Module:
    config = MASMConfig(num_subspaces=2, subspace_rank=2, init_weights=False, modules_to_save=["classifier"])
    model = get_peft_model(tiny_vit(), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.3)
    return model


def test_fresh_process_gives_identical_outputs(tmp_path, pixels):
    model = _trained_adapter()
    expected = output_of(model, pixels)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MASM" and saved["num_subspaces"] == 2
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # adapter only
    out = _run_fresh(tmp_path, tmp_path / "adapter", pixels, "import peft_masm")
    assert torch.equal(out, expected)


def test_lora_export_loads_without_peft_masm(tmp_path, pixels):
    model = _trained_adapter()
    expected = output_of(model, pixels)
    # Delta has rank <= 2*K*k, so a LoRA of that rank reproduces it exactly.
    save_as_lora(tmp_path / "lora", model, rank=2 * 2 * 2)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    out = _run_fresh(tmp_path, tmp_path / "lora", pixels, "assert 'peft_masm' not in sys.modules")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
