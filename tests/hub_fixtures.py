"""Real Hub download paths without the Hub: a pre-filled HF cache and an `olah` mirror server on loopback.

Reusable by any test (``from tests.hub_fixtures import ...`` or ``from hub_fixtures import ...``):

* ``save_tiny_lora_adapter(dir)`` writes a real PEFT LoRA adapter of a tiny ViT built from a config.
* ``fill_hf_cache(cache_dir, repo_id, files_dir)`` lays files out as the HF cache does
  (``models--org--name/{blobs,snapshots/<sha>,refs/main}``), for ``HF_HUB_OFFLINE=1`` loading by repo id.
* ``olah_mirror(repo_id, files_dir, workdir)`` serves the files from a local git repository through olah
  (``offline = true``, ``mirrors-path``) and yields its endpoint, e.g. ``http://127.0.0.1:PORT``; the server is
  stopped by its PID. If olah cannot start, the context manager raises with olah's log: nothing is skipped.
* ``use_hub(monkeypatch, endpoint=..., cache_dir=..., offline=...)`` points huggingface_hub at them
  in-process (``HF_ENDPOINT`` etc. are read once at import, so the env alone is not enough in-process);
  ``hub_env(...)`` gives the same as environment variables for a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
)


def tiny_vit(seed: int = 0):  # -> transformers.ViTModel
    """A tiny randomly initialised ViT built from a config (same seed, same weights)."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    return ViTModel(ViTConfig(**TINY_VIT)).eval()


def save_tiny_lora_adapter(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a real PEFT LoRA adapter (non-zero B so it changes the output) for ``tiny_vit(seed)``."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_vit(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def _files(files_dir: Path) -> list[Path]:
    return sorted(
        p for p in files_dir.rglob("*") if p.is_file() and ".git" not in p.relative_to(files_dir).parts
    )


def fake_commit_sha(files_dir: str | Path) -> str:
    """A deterministic 40-hex "commit" id for the content of ``files_dir``."""
    h = hashlib.sha1()
    for path in _files(Path(files_dir)):
        h.update(str(path.relative_to(files_dir)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def fill_hf_cache(cache_dir: str | Path, repo_id: str, files_dir: str | Path, revision: str = "main") -> Path:
    """Write ``files_dir`` into the HF hub cache layout; return the snapshot folder."""
    src = Path(files_dir)
    sha = fake_commit_sha(src)
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    for path in _files(src):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snapshot


def make_mirror_repo(mirrors_dir: str | Path, repo_id: str, files_dir: str | Path) -> str:
    """Commit ``files_dir`` to a git repo at ``<mirrors>/models/<org>/<name>`` (branch main); return the commit."""
    repo = Path(mirrors_dir) / "models" / repo_id
    shutil.copytree(files_dir, repo)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("-c", "commit.gpgsign=false", "commit", "-q", "-m", "adapter")
    return git("rev-parse", "HEAD").strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class OlahError(RuntimeError):
    """olah did not come up; the message carries its log."""


def _log_text(workdir: Path) -> str:
    parts = [p.read_text(errors="replace")[-4000:] for p in sorted(workdir.rglob("*.log")) if p.is_file()]
    return "\n".join(parts) or "(no log written)"


@contextmanager
def olah_mirror(
    repo_id: str, files_dir: str | Path, workdir: str | Path, timeout_s: float = 60.0
) -> Iterator[str]:
    """Serve ``files_dir`` as model repo ``repo_id`` from an olah mirror on 127.0.0.1; yield the endpoint URL."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    make_mirror_repo(work / "mirrors", repo_id, files_dir)
    port = free_port()
    config = work / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{work / "repos"}"\nmirrors-path = ["{work / "mirrors"}"]\n'
        "[accessibility]\noffline = true\n"
    )
    endpoint = f"http://127.0.0.1:{port}"
    with open(work / "olah-stdout.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(work / "logs")],
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(f"{endpoint}/api/models/{repo_id}/revision/main"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OlahError(
                    f"olah did not serve {repo_id} at {endpoint} (exit code {proc.poll()}):\n{_log_text(work)}"
                )
            time.sleep(0.2)
        yield endpoint
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started, by its PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def use_hub(
    monkeypatch,
    *,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> None:
    """Point huggingface_hub (in this process) at ``endpoint`` / ``cache_dir`` / offline mode, undone after the test."""
    from huggingface_hub import constants, hf_api

    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            hf_api.api, "endpoint", endpoint
        )  # the module-level HfApi behind file_exists & co.
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    if cache_dir is not None:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    if offline is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


def hub_env(
    *, endpoint: str | None = None, cache_dir: str | Path | None = None, offline: bool | None = None
) -> dict:
    """The environment for a subprocess pointed at ``endpoint`` / ``cache_dir`` / offline mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    if cache_dir is not None:
        env["HF_HUB_CACHE"] = str(cache_dir)
    if offline is not None:
        env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return env
