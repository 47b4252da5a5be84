"""Every relative link in the repository's Markdown files points at a file or folder that exists (a link to a file
outside the repository, or to one that moved, fails here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    files = [ROOT / name for name in listed] or sorted(ROOT.glob("*.md"))
    return [f for f in files if f.is_file() and "fixtures" not in f.parts]


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)  # code is not a link
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def _broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in _relative_links(path):
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        if not resolved.exists() or root not in (resolved, *resolved.parents):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path: Path) -> None:
    broken = _broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing or outside files: {broken}"


def test_the_check_catches_a_missing_file_and_one_outside_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "here.md").write_text("x")
    (tmp_path / "outside.md").write_text("x")
    page = root / "README.md"
    page.write_text(
        "[ok](docs/here.md#part) [web](https://example.org) [anchor](#top) [gone](docs/gone.md) "
        "[out](../outside.md)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert _broken_links(page, root.resolve()) == ["docs/gone.md", "../outside.md"]
