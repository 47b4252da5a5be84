"""The real download path, without the Hub: an olah mirror on loopback and a pre-filled HF cache.

Nothing here is mocked: huggingface_hub talks HTTP to olah (ETags, commit ids, the cache layout), and PEFT
loads adapters by repo id. If olah cannot start, the test fails with olah's log.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared hub fixtures

from hub_fixtures import (  # noqa: E402
    fill_hf_cache,
    hub_env,
    olah_mirror,
    save_tiny_lora_adapter,
    tiny_vit,
    use_hub,
)

from peft_masm.hub import AdapterNotAvailableError, resolve_adapter  # noqa: E402

REPO = "org/tiny-lora"


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter plus a 5 MB safetensors file in a subfolder (a larger, nested download)."""
    from safetensors.torch import save_file

    folder = save_tiny_lora_adapter(tmp_path_factory.mktemp("repo") / "files")
    (folder / "extra").mkdir()
    torch.manual_seed(0)
    save_file({"w": torch.randn(1280, 1024)}, str(folder / "extra" / "big.safetensors"))
    return folder


def _same_tree(a: Path, b: Path) -> list[str]:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(
        str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and ".cache" not in p.parts
    )
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    return names


def _output(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state


def test_olah_snapshot_download_is_byte_identical(repo_files: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import snapshot_download

    with olah_mirror(REPO, repo_files, tmp_path / "olah") as endpoint:
        use_hub(monkeypatch, endpoint=endpoint, cache_dir=tmp_path / "cache", offline=False)
        folder = Path(snapshot_download(REPO))
        names = _same_tree(repo_files, folder)
    assert (
        "extra/big.safetensors" in names
        and (repo_files / "extra" / "big.safetensors").stat().st_size > 5_000_000
    )
    assert folder.is_relative_to(tmp_path / "cache")
    log = (tmp_path / "olah" / "olah-stdout.log").read_text()
    assert f"GET /{REPO}/resolve/" in log and "adapter_model.safetensors" in log  # it really went over HTTP
    # The server is gone now; offline, the same snapshot comes from the cache it filled.
    use_hub(monkeypatch, offline=True)
    assert resolve_adapter(REPO) == folder


def test_olah_env_vars_in_fresh_process(repo_files: Path, tmp_path: Path) -> None:
    """What a user does: HF_ENDPOINT in the environment of a new interpreter."""
    code = f"from huggingface_hub import snapshot_download; print(snapshot_download('{REPO}'))"
    with olah_mirror(REPO, repo_files, tmp_path / "olah") as endpoint:
        env = hub_env(endpoint=endpoint, cache_dir=tmp_path / "cache")
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 0, proc.stderr
    _same_tree(repo_files, Path(proc.stdout.strip().splitlines()[-1]))


def test_peft_from_pretrained_through_olah(repo_files: Path, tmp_path: Path, monkeypatch) -> None:
    from peft import PeftModel

    expected = _output(PeftModel.from_pretrained(tiny_vit(), str(repo_files)))
    assert not torch.allclose(expected, _output(tiny_vit()))  # the adapter changes the output
    with olah_mirror(REPO, repo_files, tmp_path / "olah") as endpoint:
        use_hub(monkeypatch, endpoint=endpoint, cache_dir=tmp_path / "cache", offline=False)
        model = PeftModel.from_pretrained(tiny_vit(), REPO)
    torch.testing.assert_close(_output(model), expected, rtol=0, atol=0)


def test_prefilled_cache_offline(repo_files: Path, tmp_path: Path, monkeypatch) -> None:
    from peft import PeftModel

    snapshot = fill_hf_cache(tmp_path / "cache", REPO, repo_files)
    use_hub(monkeypatch, cache_dir=tmp_path / "cache", offline=True)
    assert resolve_adapter(REPO) == snapshot
    _same_tree(repo_files, snapshot)
    model = PeftModel.from_pretrained(tiny_vit(), REPO)
    expected = _output(PeftModel.from_pretrained(tiny_vit(), str(repo_files)))
    torch.testing.assert_close(_output(model), expected, rtol=0, atol=0)
    with pytest.raises(AdapterNotAvailableError, match="'org/other'"):
        resolve_adapter("org/other")


def test_prefilled_cache_in_fresh_offline_process(repo_files: Path, tmp_path: Path) -> None:
    fill_hf_cache(tmp_path / "cache", REPO, repo_files)
    code = (
        "import json; from peft import PeftConfig\n"
        f"print(json.dumps(PeftConfig.from_pretrained('{REPO}').to_dict(), default=str))\n"
    )
    env = hub_env(cache_dir=tmp_path / "cache", offline=True)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout.strip().splitlines()[-1])
    assert config["peft_type"] == "LORA" and config["r"] == 4
