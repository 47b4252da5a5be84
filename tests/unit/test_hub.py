"""peft_masm.hub: the model card, the push path up to the network call, and resolve_adapter's errors."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared hub fixtures

from hub_fixtures import free_port, save_tiny_lora_adapter, use_hub  # noqa: E402

from peft_masm.hub import (  # noqa: E402
    AdapterNotAvailableError,
    AdapterPushError,
    count_adapter_parameters,
    push_adapter_to_hub,
    render_model_card,
    resolve_adapter,
    save_adapter_card,
)
from peft_masm.metrics import compute_detection_metrics  # noqa: E402

BASE = "org/tiny-vit"
TRAINING = {"learning_rate": 0.001, "epochs": 2, "train_families": ["blend", "gan-grid"], "seed": 0}
SECRET = "hf_FAKEtokenFORtestsONLY0123456789abcd"


def _results() -> dict:
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, 20), 3)
    labels[:6] = [0, 0, 0, 1, 1, 1]
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    ids = np.repeat(np.arange(20), 3)
    return {
        "held-out: double-jpeg": compute_detection_metrics(labels, scores, video_ids=ids, n_bootstrap=50),
        "held-out identities": compute_detection_metrics(labels, 1 - scores / 2, n_bootstrap=0),
    }


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lora_adapter(tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture()
def carded_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "carded"
    shutil.copytree(adapter_dir, out)
    save_adapter_card(
        out,
        BASE,
        training_config=TRAINING,
        eval_results=_results(),
        datasets=["synthetic-faces"],
        repo_id="org/masm-adapter",
    )
    (out / "optimizer.pt").write_bytes(b"not for upload")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"not for upload")
    return out


# ------------------------------------------------------------------------------------------------- card


def test_card_metadata_parses(carded_adapter: Path) -> None:
    card = ModelCard.load(carded_adapter / "README.md")
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == BASE
    assert data.pipeline_tag == "image-classification"
    assert {
        "peft",
        "masm",
        "deepfake-detection",
        "image-classification",
        f"base_model:adapter:{BASE}",
    } <= set(data.tags)
    assert data.datasets == ["synthetic-faces"]
    assert data.model_name == "tiny-vit-masm"
    results = {(r.dataset_name, r.metric_name): r for r in data.eval_results}
    expected = _results()
    auc = results[("held-out: double-jpeg", "Video AUC")]
    assert (
        auc.metric_type == "roc_auc"
        and auc.task_type == "image-classification"
        and auc.metric_config == "video"
    )
    assert auc.metric_value == pytest.approx(expected["held-out: double-jpeg"]["video_auc"], abs=1e-6)
    assert results[("held-out identities", "Frame EER")].metric_value == pytest.approx(
        expected["held-out identities"]["frame_eer"], abs=1e-6
    )
    assert ("held-out identities", "Video AUC") not in results  # no video ids, no video metrics
    assert len(data.eval_results) == 8 + 4


def test_card_body_sections(carded_adapter: Path) -> None:
    text = ModelCard.load(carded_adapter / "README.md").text
    load_section = text.split("## How to load it")[1].split("## Training recipe")[0]
    assert load_section.index("import peft_masm") < load_section.index(
        'PeftModel.from_pretrained(base, "org/masm-adapter")'
    )
    assert "KeyError: 'MASM'" in load_section and "HF_HUB_OFFLINE=1" in load_section
    recipe = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == TRAINING
    assert "smoke-scale synthetic" in text and "not** FaceForensics++" in text
    assert "| held-out: double-jpeg |" in text
    n_params = count_adapter_parameters(carded_adapter)
    assert n_params == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (q, v) x (A: 4x32, B: 32x4)
    assert f"holds {n_params:,} numbers" in text
    assert yaml.safe_load((carded_adapter / "training_config.yaml").read_text()) == TRAINING


def test_card_without_results_and_for_real_data() -> None:
    card = render_model_card(BASE, {"peft_type": "MASM", "r": 4}, None, None, None, synthetic_benchmark=False)
    assert card.data.eval_results is None and card.data.datasets is None
    assert "No evaluation results were recorded" in card.text
    assert "No training configuration was recorded" in card.text
    assert "held-out split of the training domain" in card.text and "smoke-scale" not in card.text
    assert "| `peft_type` | `MASM` |" in card.text


def test_card_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base_model is empty"):
        render_model_card("", {}, None, None, None)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        save_adapter_card(tmp_path, BASE)
    with pytest.raises(FileNotFoundError, match="template_path"):
        render_model_card(BASE, {}, None, None, None, template_path=tmp_path / "missing.md")


# ------------------------------------------------------------------------------------------------- push


class _Recorder:
    """Stands in for the two network calls of push_adapter_to_hub and records what they were asked to do."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail_with = fail_with

    def create_repo(self, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        kwargs["selected"] = sorted(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
        self.calls.append(("upload_folder", kwargs))
        if self.fail_with is not None:
            raise self.fail_with

        class Info:
            commit_url = f"https://hub.example/{kwargs['repo_id']}/commit/abc"

        return Info()


def _patch(monkeypatch: pytest.MonkeyPatch, recorder: _Recorder) -> None:
    monkeypatch.setattr(HfApi, "create_repo", recorder.create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", recorder.upload_folder)


def test_push_uploads_adapter_files_only(carded_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    _patch(monkeypatch, rec)
    url = push_adapter_to_hub(carded_adapter, "org/masm-adapter", token=SECRET, private=True)
    assert url == "https://hub.example/org/masm-adapter/commit/abc"
    (name1, create), (name2, upload) = rec.calls
    assert name1 == "create_repo" and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == SECRET and upload["token"] == SECRET
    assert name2 == "upload_folder" and upload["repo_id"] == "org/masm-adapter"
    assert upload["selected"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.yaml",
    ]


def test_push_token_from_env_never_logged_or_printed(
    carded_adapter: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    rec = _Recorder()
    _patch(monkeypatch, rec)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with caplog.at_level(logging.DEBUG):
        push_adapter_to_hub(carded_adapter, "org/masm-adapter")
    assert rec.calls[1][1]["token"] == SECRET  # the env token was used ...
    out, err = capfd.readouterr()
    assert caplog.records and "org/masm-adapter" in caplog.text  # ... and the push was logged ...
    assert SECRET not in caplog.text + out + err  # ... without the token


def test_push_failure_hides_token(
    carded_adapter: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx2

    request = httpx2.Request(
        "POST", "https://hub.example/api/repos/create", headers={"authorization": f"Bearer {SECRET}"}
    )
    response = httpx2.Response(401, request=request, text=f"invalid token {SECRET}")
    failure = HfHubHTTPError(f"401 Unauthorized for token {SECRET}", response=response)
    _patch(monkeypatch, _Recorder(fail_with=failure))
    with caplog.at_level(logging.DEBUG), pytest.raises(AdapterPushError) as info:
        push_adapter_to_hub(carded_adapter, "org/masm-adapter", token=SECRET)
    text = "".join(traceback.format_exception(info.value))
    assert "401 Unauthorized" in text and "<redacted>" in text and "org/masm-adapter" in text
    assert SECRET not in text and SECRET not in caplog.text


def test_push_refuses_incomplete_folder(
    adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = _Recorder()
    _patch(monkeypatch, rec)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors, README.md"):
        push_adapter_to_hub(tmp_path, "org/x", token=SECRET)
    shutil.copytree(adapter_dir, tmp_path / "no-card")
    (tmp_path / "no-card" / "README.md").unlink()  # PEFT's own card, replaced by save_adapter_card
    with pytest.raises(FileNotFoundError, match="save_adapter_card"):
        push_adapter_to_hub(tmp_path / "no-card", "org/x", token=SECRET)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_adapter_to_hub(tmp_path / "nope", "org/x", token=SECRET)
    assert rec.calls == []


def test_push_without_any_token(
    carded_adapter: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants as constants

    rec = _Recorder()
    _patch(monkeypatch, rec)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(AdapterPushError, match="HF_TOKEN"):
        push_adapter_to_hub(carded_adapter, "org/x")
    assert rec.calls == []


# ------------------------------------------------------------------------------------------------- resolve


def test_resolve_local_dir(adapter_dir: Path, tmp_path: Path) -> None:
    assert resolve_adapter(adapter_dir) == adapter_dir
    with pytest.raises(AdapterNotAvailableError, match="no adapter_config.json"):
        resolve_adapter(tmp_path)


def test_resolve_offline_not_cached_names_repo_and_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_hub(monkeypatch, cache_dir=tmp_path / "cache", offline=True)
    with pytest.raises(AdapterNotAvailableError) as info:
        resolve_adapter("org/not-cached", revision="v1")
    message = str(info.value)
    for needle in (
        "'org/not-cached'",
        "revision v1",
        "HF_HUB_OFFLINE=1",
        "hf download org/not-cached",
        "local path",
    ):
        assert needle in message


def test_resolve_unreachable_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub(
        monkeypatch, endpoint=f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path / "cache", offline=False
    )
    with pytest.raises(AdapterNotAvailableError, match="'org/nowhere'.*HF_ENDPOINT"):
        resolve_adapter("org/nowhere")


def test_resolve_invalid_id(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotAvailableError, match="not an existing local directory"):
        resolve_adapter(str(tmp_path / "missing" / "deep" / "dir"))


def test_adapter_config_roundtrip(adapter_dir: Path) -> None:
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
