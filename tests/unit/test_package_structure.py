"""The package's shape, read from its source: the tuner is a unit, no import circles, no private names across
modules. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "peft_masm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(p): p for p in PACKAGE.rglob("*.py") if "masm_detection" not in p.parts
}  # the `evaluate` metric script is loaded by the evaluate package, not imported


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every project import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [
                (alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("peft_masm")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            target = _resolve(module, path.name == "__init__.py", node)
            if not target.startswith("peft_masm"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_the_tuner_imports_nothing_from_the_application():
    offenders = [
        f"{module} imports {target} (line {line})"
        for module in MODULES
        if module.startswith("peft_masm.tuner")
        for target, _, line in _imports(module)
        if not target.startswith("peft_masm.tuner")
    ]
    assert not offenders, offenders


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_no_private_name_is_imported_across_modules():
    offenders = [
        f"{module} imports {name} from {target} (line {line})"
        for module in MODULES
        for target, name, line in _imports(module)
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # dunders are public
    ]
    assert not offenders, offenders


def test_the_graph_sees_imports_inside_functions():
    # detector.py imports the Hub helpers inside its functions; the test must see those edges.
    assert "peft_masm.hub" in _graph()["peft_masm.detector"]
