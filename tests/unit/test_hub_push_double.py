"""push_adapter_to_hub over HTTP against a TEST DOUBLE of the Hub's commit API (tests/hub_commit_double.py).

The real Hub cannot be reached and no registry package accepts uploads; the double speaks the requests that
huggingface_hub sends (create, validate-yaml, preupload, commit) and serves the result back for a round trip.
"""

from __future__ import annotations

import filecmp
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared hub fixtures

from hub_commit_double import commit_api_double  # noqa: E402
from hub_fixtures import save_tiny_lora_adapter, tiny_vit, use_hub  # noqa: E402

from peft_masm.hub import push_adapter_to_hub, resolve_adapter, save_adapter_card  # noqa: E402

SECRET = "hf_DOUBLEtokenFORtestsONLY9876543210zyx"
REPO = "org/pushed-adapter"
UPLOADED = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_config.yaml"]


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    out = save_tiny_lora_adapter(tmp_path / "run")
    save_adapter_card(out, "org/tiny-vit", training_config={"epochs": 1}, repo_id=REPO)
    (out / "optimizer.pt").write_bytes(b"x" * 100)
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "adapter_model.safetensors").write_bytes(b"stale")
    return out


def test_push_then_pull_round_trip(adapter: Path, tmp_path: Path, monkeypatch, caplog, capfd) -> None:
    from peft import PeftModel

    with commit_api_double() as hub:
        use_hub(monkeypatch, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", offline=False)
        with caplog.at_level(logging.DEBUG):
            url = push_adapter_to_hub(adapter, REPO, token=SECRET, private=True, commit_message="first")
        repo = hub.repos[REPO]
        assert sorted(repo.files) == UPLOADED  # optimizer state and checkpoints stay local
        assert repo.private is True and repo.messages == ["first"]
        assert url == f"{hub.endpoint}/{REPO}/commit/{repo.commits[-1]}"
        assert (
            hub.yaml_seen and "library_name: peft" in hub.yaml_seen[0]
        )  # the card went through validate-yaml
        writes = [r for r in hub.requests if r.method == "POST"]
        assert [r.path for r in writes] == [
            "/api/repos/create",
            "/api/validate-yaml",
            f"/api/models/{REPO}/preupload/main",
            f"/api/models/{REPO}/commit/main",
        ]
        assert all(r.authorization == f"Bearer {SECRET}" for r in writes)
        # Pushing again: the repo exists (409 from create) and the push still succeeds.
        push_adapter_to_hub(adapter, REPO, token=SECRET, commit_message="second")
        assert repo.messages == ["first", "second"]
        # Pull it back by repo id through the real download code.
        folder = resolve_adapter(REPO)
        model = PeftModel.from_pretrained(tiny_vit(), REPO)
    for name in UPLOADED:
        assert filecmp.cmp(adapter / name, folder / name, shallow=False), name
    expected = PeftModel.from_pretrained(tiny_vit(), str(adapter))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).last_hidden_state, expected(pixel_values=x).last_hidden_state
        )
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text + out + err


def test_push_rejected_card_reports_without_token(adapter: Path, monkeypatch) -> None:
    from peft_masm.hub import AdapterPushError

    readme = adapter / "README.md"
    readme.write_text("---\nlibrary_name: [unclosed\n---\n# broken card\n")
    with commit_api_double() as hub:
        use_hub(monkeypatch, endpoint=hub.endpoint, offline=False)
        with pytest.raises(AdapterPushError, match="README") as info:
            push_adapter_to_hub(adapter, REPO, token=SECRET)
        assert not hub.repos[REPO].files
    assert SECRET not in str(info.value)
