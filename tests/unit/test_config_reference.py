"""The generated tables of the user docs equal the code they describe.

- docs/configuration.md: one row per ``MASMConfig`` field (name, type, default, its ``metadata["help"]``) and the
  presets (``peft_masm.presets.PRESETS``);
- docs/method.md: the default targets per ``model_type`` (``DEFAULT_ATTENTION_TARGETS``, ``DEFAULT_MLP_TARGETS``).

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``. After changing a field, a default, a help
string, a preset or a target, regenerate them with ``.venv/bin/python tests/unit/test_config_reference.py``.
No model is loaded here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from peft.config import PeftConfig

from peft_masm import MASMConfig
from peft_masm.presets import PRESETS
from peft_masm.tuner import DEFAULT_ATTENTION_TARGETS, DEFAULT_MLP_TARGETS

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
METHOD = ROOT / "docs" / "method.md"
REGENERATE = "python tests/unit/test_config_reference.py"


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped (also inside code spans, as GFM wants)."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return _cell(f"`{text}`")


def _type_name(annotation: Any) -> str:
    """The field's annotation as written; a ``Literal`` becomes its allowed values."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    if literal:
        return " | ".join(json.dumps(value) for value in ast.literal_eval(f"[{literal.group(1)}]"))
    return text


def _default(field: dataclasses.Field) -> str:
    if field.name == "peft_masm_version":
        return "the installed version"
    if field.default is not dataclasses.MISSING:
        return _code(json.dumps(field.default) if isinstance(field.default, str) else repr(field.default))
    if field.default_factory is not dataclasses.MISSING:
        return _code(repr(field.default_factory()))
    return "required"


def masm_fields() -> list[dataclasses.Field]:
    """``MASMConfig``'s own fields, in declaration order (not those it inherits from ``peft.PeftConfig``)."""
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f for f in dataclasses.fields(MASMConfig) if f.name not in inherited]


def config_reference_markdown() -> str:
    """The ``MASMConfig`` field table of docs/configuration.md."""
    rows = ["| field | type | default | help |", "|---|---|---|---|"]
    for f in masm_fields():
        rows.append(
            f"| {_code(f.name)} | {_code(_type_name(f.type))} | {_default(f)} | {_cell(f.metadata['help'])} |"
        )
    return "\n".join(rows)


def presets_markdown() -> str:
    """The presets table of docs/configuration.md: the fields each preset sets (the rest keep their defaults)."""
    rows = ["| preset | fields it sets |", "|---|---|"]
    for name, fields in PRESETS.items():
        values = ", ".join(_code(f"{key}={value!r}") for key, value in fields.items())
        rows.append(f"| {_code(name)} | {values} |")
    return "\n".join(rows)


def _targets(targets: list[str] | str) -> str:
    if isinstance(targets, str):
        return f"regex {_code(targets)}"
    return ", ".join(_code(name) for name in targets)


def targets_markdown() -> str:
    """The default-targets table of docs/method.md."""
    rows = [
        "| model_type | attention targets (the default) | MLP (`include_mlp=True` adds) |",
        "|---|---|---|",
    ]
    for model_type, attention in DEFAULT_ATTENTION_TARGETS.items():
        rows.append(
            f"| {_code(model_type)} | {_targets(attention)} | {_targets(DEFAULT_MLP_TARGETS[model_type])} |"
        )
    return "\n".join(rows)


TABLES: dict[str, tuple[Path, Callable[[], str]]] = {
    "config-table": (CONFIGURATION, config_reference_markdown),
    "presets-table": (CONFIGURATION, presets_markdown),
    "targets-table": (METHOD, targets_markdown),
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?)\n?(<!-- {name}:end -->)", re.DOTALL)


def documented_table(path: Path, name: str) -> str:
    """The text between the markers ``name`` in ``path``."""
    match = _block(name).search(path.read_text(encoding="utf-8"))
    assert match, f"{path.relative_to(ROOT)} has no <!-- {name}:start --> ... <!-- {name}:end --> block"
    return match.group(2)


def regenerate(tables: Mapping[str, tuple[Path, Callable[[], str]]] = TABLES) -> list[Path]:
    """Rewrite every generated table in place; returns the files that changed."""
    changed = []
    for name, (path, render) in tables.items():
        text = path.read_text(encoding="utf-8")
        documented_table(path, name)  # the markers must be there
        new = _block(name).sub(lambda m, render=render: m.group(1) + render() + "\n" + m.group(3), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed += [path] if path not in changed else []
    return changed


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_generated_tables_equal_the_code(name: str) -> None:
    path, render = TABLES[name]
    assert documented_table(path, name) == render(), (
        f"the {name} of {path.relative_to(ROOT)} is out of date with the code: run `{REGENERATE}` and commit it"
    )


def test_every_field_has_help_and_a_row() -> None:
    table = config_reference_markdown()
    for f in masm_fields():
        assert f.metadata.get("help"), f"MASMConfig.{f.name} has no help text"
        assert f"| `{f.name}` |" in table


def test_cells_escape_pipes_and_keep_one_line() -> None:
    assert _cell("relu(||x|| - 1)\n  next") == "relu(\\|\\|x\\|\\| - 1) next"
    assert _type_name("Literal['raise', 'skip']") == '"raise" | "skip"'


def test_regenerate_rewrites_only_the_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- t:start -->\n<!-- t:end -->\noutro\n", encoding="utf-8")
    assert regenerate({"t": (page, lambda: "| new |")}) == [page]
    assert page.read_text(encoding="utf-8") == "intro\n<!-- t:start -->\n| new |\n<!-- t:end -->\noutro\n"
    assert regenerate({"t": (page, lambda: "| new |")}) == []


if __name__ == "__main__":
    written = regenerate()
    print("\n".join(f"rewrote {p.relative_to(ROOT)}" for p in written) or "the tables are up to date")
    sys.exit(0)
