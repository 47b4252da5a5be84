"""Issue 28 items 1 and 3: ``MASMDetector``'s save_pretrained / from_pretrained / push_to_hub, the detector config
(pooling, face crop) saved once and read back, one card write per save, no change to the caller's config, and
the deprecated functions. A tiny CLIP made by the test; the Hub is the commit-API double (offline)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import RepoCard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared hub fixtures
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from hub_commit_double import commit_api_double  # noqa: E402
from hub_fixtures import use_hub  # noqa: E402
from recipe_fixtures import save_tiny_clip  # noqa: E402

from peft_masm import DetectorConfig, MASMConfig, MASMDetector  # noqa: E402
from peft_masm.detector import (  # noqa: E402
    build_detector,
    load_detector,
    load_image_processor,
    push_detector_to_hub,
    save_detector,
)

SECRET = "hf_TRIOtokenFORtestsONLY0123456789abcdef"
REPO = "org/tiny-masm-detector"
SMALL = {"num_subspaces": 1, "subspace_rank": 1, "layer_mask": "none"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


def _trained(detector: MASMDetector) -> MASMDetector:
    model = detector.model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 1, 0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return detector.eval()


def _pixels() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def card_writes(monkeypatch) -> list[str]:
    """Every model card saved (PEFT's and this package's go through ``RepoCard.save``)."""
    written: list[str] = []
    original = RepoCard.save

    def save(self, filepath):
        written.append(str(filepath))
        return original(self, filepath)

    monkeypatch.setattr(RepoCard, "save", save)
    return written


def test_save_then_from_pretrained_gives_the_same_detector(tiny, tmp_path):
    config = DetectorConfig(pooling="pooler_output", face_crop_size=200, face_crop_margin=1.5)
    detector = _trained(
        MASMDetector.build(str(tiny), MASMConfig(**SMALL), pooling="pooler_output", config=config)
    )
    expected = detector.predict(_pixels())
    training = {"epochs": 1, "face_detector": "lbp"}
    folder = detector.save_pretrained(tmp_path / "det", training_config=training)

    loaded = MASMDetector.from_pretrained(folder)
    assert isinstance(loaded, MASMDetector) and not loaded.model.training
    torch.testing.assert_close(loaded.predict(_pixels()), expected)
    assert loaded.config == config and loaded.training_config == training
    saved = json.loads((folder / "detector_config.json").read_text())
    assert saved == {"pooling": "pooler_output", "face_crop_size": 200, "face_crop_margin": 1.5}
    assert yaml.safe_load((folder / "training_config.yaml").read_text()) == training
    assert (folder / "preprocessor_config.json").is_file()
    # images through the saved processor: the same as processing them by hand
    images = [torch.randint(0, 256, (40, 36, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    by_hand = detector.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(loaded(images), detector.predict(by_hand))
    # the card describes the crop of the saved config
    card = (folder / "README.md").read_text()
    assert "enlarged 1.5 times" in card and "200 px" in card and "MASMDetector.from_pretrained" in card


def test_the_card_is_written_once_per_save(tiny, tmp_path, card_writes):
    detector = MASMDetector.build(str(tiny), MASMConfig(**SMALL))
    folder = detector.save_pretrained(tmp_path / "det", training_config={"epochs": 1})
    assert len(card_writes) == 1
    card = ModelCard.load(folder / "README.md")
    assert "import peft_masm" in card.text and "[More Information Needed]" not in card.text
    assert card.data.library_name == "peft" and "masm" in card.data.tags

    card_writes.clear()  # PEFT's own save of a detector's model writes this package's card instead of its own
    detector.model.save_pretrained(tmp_path / "plain")
    assert len(card_writes) == 1 and "import peft_masm" in (tmp_path / "plain" / "README.md").read_text()


def test_a_card_the_user_wrote_is_kept(tiny, tmp_path):
    model = build_detector(str(tiny), MASMConfig(**SMALL))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "README.md").write_text("# My detector\n\nNotes I wrote myself.\n")
    model.save_pretrained(tmp_path / "plain")
    assert "Notes I wrote myself." in (tmp_path / "plain" / "README.md").read_text()


def test_the_tuner_calls_no_hook_and_writes_its_own_card():
    from peft_masm.tuner import config as tuner_config

    assert tuner_config._save_hooks == []  # import peft_masm registers nothing into the tuner
    with pytest.warns(FutureWarning, match="register_save_hook is deprecated"):
        tuner_config.register_save_hook(lambda config, folder: None)
    tuner_config._save_hooks.clear()


@pytest.mark.parametrize("kind", ["masm", "lora"])
def test_build_detector_leaves_the_callers_config_alone(tiny, kind):
    from peft import LoraConfig

    config = MASMConfig(**SMALL) if kind == "masm" else LoraConfig(r=2)
    before = config.to_dict()
    model = build_detector(str(tiny), config)
    assert config.to_dict() == before
    assert config.target_modules is None and config.modules_to_save is None
    used = model.peft_config["default"]
    assert used is not config and "classifier" in used.modules_to_save
    adapted = {name.rsplit(".", 2)[-2] for name, _ in model.named_modules() if name.endswith(".base_layer")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj"}  # the tuner's default targets, both methods


def test_decompose_flag_is_deprecated_and_the_svd_runs_once(tiny, monkeypatch):
    from peft_masm.tuner import model as tuner_model

    calls = []
    original = tuner_model.minor_triplets_many

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tuner_model, "minor_triplets_many", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = build_detector(str(tiny), MASMConfig(**SMALL))
    assert len(calls) == 1 and model.base_model.decompose() == 0
    with pytest.warns(FutureWarning, match=r"decompose=.*no effect"):
        build_detector(str(tiny), MASMConfig(**SMALL), decompose=False)


def test_crop_settings_are_read_from_the_saved_config(tiny, tmp_path, monkeypatch):
    from peft_masm import cli, evaluation
    from peft_masm.data import faces

    seen = []

    class Cropper:
        def __init__(self, detector="auto", size=0, margin=0.0):
            seen.append((detector, size, margin))

    monkeypatch.setattr(faces, "FaceCropper", Cropper)
    config = DetectorConfig(face_crop_size=180, face_crop_margin=1.25)
    MASMDetector.build(str(tiny), MASMConfig(**SMALL), config=config).save_pretrained(tmp_path / "det")
    detector = MASMDetector.from_pretrained(tmp_path / "det")
    cli._face_fn({}, "lbp", detector.config)
    evaluation.face_cropper(tmp_path / "det", "lbp")
    evaluation.face_cropper(detector, "mtcnn")
    assert seen == [("lbp", 180, 1.25), ("lbp", 180, 1.25), ("mtcnn", 180, 1.25)]
    # a folder saved before the config had crop fields takes the defaults
    (tmp_path / "det" / "detector_config.json").write_text(json.dumps({"pooling": "model"}))
    assert DetectorConfig.from_pretrained(tmp_path / "det") == DetectorConfig()


def test_push_to_hub_needs_no_save_first(tiny, tmp_path, monkeypatch):
    detector = _trained(MASMDetector.build(str(tiny), MASMConfig(**SMALL)))
    expected = detector.predict(_pixels())
    with commit_api_double() as hub:
        use_hub(monkeypatch, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", offline=False)
        url = detector.push_to_hub(REPO, token=SECRET, training_config={"epochs": 1})
        repo = hub.repos[REPO]
        assert url == f"{hub.endpoint}/{REPO}/commit/{repo.commits[-1]}"
        assert sorted(repo.files) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "detector_config.json",
            "preprocessor_config.json",
            "training_config.yaml",
        ]
        assert f'MASMDetector.from_pretrained("{REPO}")' in repo.files["README.md"].decode()
        pulled = MASMDetector.from_pretrained(REPO)
    torch.testing.assert_close(pulled.predict(_pixels()), expected)
    assert not list(tmp_path.glob("*detector*"))  # nothing left beside the test's own folders


def test_deprecated_functions_warn_and_still_work(tiny, tmp_path, monkeypatch):
    model = build_detector(str(tiny), MASMConfig(**SMALL)).eval()
    expected = MASMDetector(model).predict(_pixels())
    processor = load_image_processor(str(tiny))
    with pytest.warns(FutureWarning, match=r"MASMDetector\(model, image_processor\)\.save_pretrained"):
        folder = save_detector(model, tmp_path / "det", image_processor=processor)
    with pytest.warns(FutureWarning, match=r"MASMDetector\.from_pretrained"):
        loaded, loaded_processor = load_detector(folder)
    torch.testing.assert_close(MASMDetector(loaded).predict(_pixels()), expected)
    assert loaded_processor.crop_size == processor.crop_size
    with commit_api_double() as hub:
        use_hub(monkeypatch, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", offline=False)
        with pytest.warns(FutureWarning, match=r"detector\.push_to_hub"):
            push_detector_to_hub(folder, REPO, token=SECRET)
        assert "detector_config.json" in hub.repos[REPO].files
