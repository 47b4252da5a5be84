"""build_detector / MASMDetector (save_pretrained, from_pretrained) on a tiny CLIP made by the test (offline)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from recipe_fixtures import save_tiny_clip  # noqa: E402
from tiny_backbones import save_packaged_like_clip  # noqa: E402

from peft_masm import BaseModelMismatchError, MASMConfig  # noqa: E402
from peft_masm.detector import (  # noqa: E402
    ID2LABEL,
    BackboneNotAvailableError,
    MASMDetector,
    build_detector,
    load_base_classifier,
    predict_proba,
)
from peft_masm.hub import AdapterNotAvailableError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def _train_a_little(model, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 1, 0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_build_detector_defaults(tiny):
    model = build_detector(str(tiny))
    config = model.peft_config["default"]
    assert config.base_model_name_or_path == str(tiny)
    assert "classifier" in config.modules_to_save
    assert model.config.id2label == ID2LABEL and model.config.num_labels == 2
    adapted = {name.rsplit(".", 1)[1] for name, _ in model.base_model.masm_layers()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("masm_U" in n for n in trainable)
    # decomposed eagerly: nothing is left pending
    assert model.base_model.decompose() == 0


def test_save_load_round_trip_gives_same_scores(tiny, tmp_path):
    model = build_detector(str(tiny), MASMConfig(num_subspaces=2, subspace_rank=1, layer_mask="none"))
    _train_a_little(model)
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    expected = predict_proba(model, x)
    model.save_pretrained(tmp_path / "adapter")
    detector = MASMDetector.from_pretrained(tmp_path / "adapter")
    loaded, processor = detector.model, detector.image_processor
    assert not loaded.training
    torch.testing.assert_close(predict_proba(loaded, x), expected)
    assert processor.crop_size["height"] == 32
    assert ((expected >= 0) & (expected <= 1)).all()


def test_image_size_is_honoured_with_interpolated_positions(tiny, tmp_path):
    model = build_detector(str(tiny), MASMConfig(num_subspaces=1, subspace_rank=1, layer_mask="none"))
    model.save_pretrained(tmp_path / "adapter")
    detector = MASMDetector.from_pretrained(tmp_path / "adapter", image_size=48)
    loaded, processor = detector.model, detector.image_processor
    assert processor.crop_size == {"height": 48, "width": 48}
    assert predict_proba(loaded, torch.randn(2, 3, 48, 48)).shape == (2,)


def test_adapter_for_another_base_is_refused(tiny, tmp_path):
    model = build_detector(str(tiny), MASMConfig(num_subspaces=1, subspace_rank=1, layer_mask="none"))
    model.save_pretrained(tmp_path / "adapter")
    other = save_tiny_clip(tmp_path / "other", seed=1)
    with pytest.raises(BaseModelMismatchError):
        MASMDetector.from_pretrained(tmp_path / "adapter", base_model=str(other))


def test_unreachable_hub_ids_give_clear_errors(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(AdapterNotAvailableError, match="HF_HUB_OFFLINE|download it once"):
        MASMDetector.from_pretrained("nobody-org/no-such-adapter")
    with pytest.raises(BackboneNotAvailableError, match="offline alias"):
        build_detector("nobody-org/no-such-backbone")


def test_lora_baseline_detector(tiny, tmp_path):
    from peft import LoraConfig

    model = build_detector(str(tiny), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "classifier" in model.peft_config["default"].modules_to_save
    _train_a_little(model)
    model.save_pretrained(tmp_path / "lora")
    loaded = MASMDetector.from_pretrained(tmp_path / "lora").model
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(predict_proba(loaded, x), predict_proba(model, x))


def test_pooler_output_head_reads_the_layer_normed_cls_token(tmp_path):
    """Effort's classifier reads CLIP's pooler_output; pooling='pooler_output' gives exactly that."""
    tiny = save_tiny_clip(tmp_path / "clip")
    model = build_detector(str(tiny), MASMConfig(num_subspaces=1, subspace_rank=1), pooling="pooler_output")
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inner = model.get_base_model()
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        expected = inner.classifier(inner.vision_model(pixel_values=x).pooler_output)
        default = build_detector(str(tiny), MASMConfig(num_subspaces=1, subspace_rank=1)).eval()(
            pixel_values=x
        )
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, default.logits)  # the transformers head averages patch tokens instead
    MASMDetector(model).save_pretrained(tmp_path / "det")
    loaded = MASMDetector.from_pretrained(tmp_path / "det").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, logits)
    assert (tmp_path / "det" / "README.md").read_text().count("import peft_masm") >= 1


def test_pooler_output_is_refused_for_a_backbone_without_it(tmp_path):
    from peft_masm.detector import with_pooling

    with pytest.raises(ValueError, match="pooling='pooler_output' is implemented for CLIP"):
        with_pooling(torch.nn.Linear(2, 2), "pooler_output")


def test_building_and_loading_a_detector_prints_no_future_warning(tiny, tmp_path):
    """Issue 10: PEFT's probe of transformers' deprecated `is_gradient_checkpointing` warned on every wrap."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = build_detector(str(tiny))
        MASMDetector(model).save_pretrained(tmp_path / "det")
        MASMDetector.from_pretrained(tmp_path / "det")


@contextmanager
def load_reports() -> Iterator[list[str]]:
    """The load reports transformers shows (those that pass the filters of its ``modeling_utils`` logger)."""
    shown: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "LOAD REPORT" in record.getMessage():
                shown.append(record.getMessage())

    logger, handler = logging.getLogger("transformers.modeling_utils"), Keep()
    logger.addHandler(handler)
    try:
        yield shown
    finally:
        logger.removeHandler(handler)


def test_no_load_report_or_hub_lookup_for_the_detector_head(tmp_path, monkeypatch):
    """Issue 26.11: building, saving and loading a detector on a packaged backbone printed transformers'
    "classifier MISSING ... Consider training" (the head is trained, or comes from the adapter) and, at every save,
    PEFT's Hub look-up of the alias ("Could not find a config file in clip-vit-b16")."""
    monkeypatch.setenv("PEFT_MASM_CACHE", str(tmp_path / "cache"))
    save_packaged_like_clip(tmp_path / "cache")
    with load_reports() as shown, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_detector("clip-vit-b16", MASMConfig(num_subspaces=1, subspace_rank=1))
        MASMDetector(model).save_pretrained(tmp_path / "det")
        MASMDetector.from_pretrained(tmp_path / "det")
    assert shown == []
    peft_warnings = [str(w.message) for w in caught if "clip-vit-b16" in str(w.message)]
    assert peft_warnings == []


def test_a_load_report_about_the_backbone_is_still_shown(tmp_path):
    """Only the report about the new head is held back: a backbone weight missing from the checkpoint shows."""
    from safetensors.torch import load_file, save_file

    folder = save_packaged_like_clip(tmp_path / "cache")
    weights = load_file(folder / "model.safetensors")
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with load_reports() as shown:
        load_base_classifier(str(folder), quiet_new_head=True)
    assert len(shown) == 1 and "post_layernorm.weight" in shown[0] and "classifier.weight" in shown[0]
