"""End to end: a MASM adapter saved with its card, loaded by repo id through an olah mirror and from the HF cache.

`import peft_masm` registers the MASM tuner type; the fresh-process test shows the card's warning is true.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for the shared hub fixtures

from hub_fixtures import TINY_VIT, fill_hf_cache, hub_env, olah_mirror, tiny_vit, use_hub  # noqa: E402

import peft_masm  # noqa: E402,F401  registers MASM with PEFT
from peft_masm import MASMConfig  # noqa: E402
from peft_masm.hub import save_adapter_card  # noqa: E402

REPO = "org/tiny-masm"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def masm_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import get_peft_model

    out = tmp_path_factory.mktemp("masm") / "adapter"
    config = MASMConfig(target_modules=["q_proj", "v_proj"], num_subspaces=2, subspace_rank=2)
    model = get_peft_model(tiny_vit(), config)
    _output(model)  # the factors are decomposed lazily on the first forward; edit them after it
    torch.manual_seed(1)
    with torch.no_grad():  # move the trainable factors away from their initial values so the adapter matters
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(out))
    save_adapter_card(out, "org/tiny-vit", training_config={"epochs": 1, "tiny_vit": TINY_VIT}, repo_id=REPO)
    return out


def _output(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model(pixel_values=torch.randn(2, 3, 32, 32)).last_hidden_state


@pytest.fixture(scope="module")
def expected(masm_adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    out = _output(PeftModel.from_pretrained(tiny_vit(), str(masm_adapter)))
    assert not torch.allclose(out, _output(tiny_vit()), atol=1e-6)  # the adapter changes the output
    return out


def test_masm_through_olah_mirror(
    masm_adapter: Path, expected: torch.Tensor, tmp_path: Path, monkeypatch
) -> None:
    from peft import PeftModel

    with olah_mirror(REPO, masm_adapter, tmp_path / "olah") as endpoint:
        use_hub(monkeypatch, endpoint=endpoint, cache_dir=tmp_path / "cache", offline=False)
        model = PeftModel.from_pretrained(tiny_vit(), REPO)
    assert model.peft_config["default"].peft_type == "MASM"
    torch.testing.assert_close(_output(model), expected, rtol=0, atol=0)


def test_masm_from_prefilled_cache_offline(
    masm_adapter: Path, expected: torch.Tensor, tmp_path: Path, monkeypatch
) -> None:
    from peft import PeftModel

    fill_hf_cache(tmp_path / "cache", REPO, masm_adapter)
    use_hub(monkeypatch, cache_dir=tmp_path / "cache", offline=True)
    model = PeftModel.from_pretrained(tiny_vit(), REPO)
    torch.testing.assert_close(_output(model), expected, rtol=0, atol=0)


LOAD = """
import sys
sys.path.insert(0, {tests!r})
{maybe_import}
from peft import PeftModel
from hub_fixtures import tiny_vit
model = PeftModel.from_pretrained(tiny_vit(), {repo!r})
print("loaded", model.peft_config["default"].peft_type.value)
"""


@pytest.mark.parametrize("with_import", [True, False])
def test_fresh_process_needs_import_peft_masm(masm_adapter: Path, tmp_path: Path, with_import: bool) -> None:
    fill_hf_cache(tmp_path / "cache", REPO, masm_adapter)
    code = LOAD.format(
        tests=str(Path(__file__).resolve().parents[1]),
        repo=REPO,
        maybe_import="import peft_masm" if with_import else "",
    )
    env = hub_env(cache_dir=tmp_path / "cache", offline=True)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if with_import:
        assert proc.returncode == 0, proc.stderr
        assert "loaded MASM" in proc.stdout
    else:
        assert proc.returncode != 0 and "KeyError: 'MASM'" in proc.stderr, proc.stderr[-2000:]
