"""Fetch PEFT's own test modules for the installed peft version and re-parametrise them for MASM.

PEFT's sdist on the package index ships ``tests/`` (the wheel does not). At collection time we
download the sdist of exactly the installed version once, cache it under
``$PEFT_MASM_CACHE/peft-sdist`` (default ``~/.cache/peft_masm/peft-sdist``), extract its ``tests/``
and import those modules as a private package. PEFT's code is never committed to this repository.

``remap_test_class`` builds a subclass of an upstream test class whose parametrised tests run over
MASM cases instead of upstream's case lists; every other upstream test is left out, and the reason
is recorded so the test modules can list it.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

# Imports the upstream test modules make but the tests we run never use, stubbed only while the
# upstream modules import and only when the package is not installed: module -> attribute names.
OPTIONAL_IMPORTS: dict[str, tuple[str, ...]] = {
    "diffusers": ("StableDiffusionPipeline",),
    "datasets": ("load_dataset",),
}


class UpstreamTestsUnavailable(RuntimeError):
    """PEFT's test modules for the installed version could not be fetched or imported."""


def peft_version() -> str:
    """The installed peft version, e.g. ``"0.21.2"``."""
    return importlib.metadata.version("peft")


def cache_root() -> Path:
    """Where the sdist and its extracted ``tests/`` live (never inside the repository)."""
    base = os.environ.get("PEFT_MASM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_masm")
    return Path(base) / "peft-sdist"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: the two xdist workers must not download and extract at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _how_to_fix(version: str, root: Path) -> str:
    return (
        f"MASM runs PEFT {version}'s own tuner tests, which ship only in PEFT's sdist. Fix: make the package index "
        f"(PyPI) reachable once and rerun, or put the sdist into the cache yourself:\n"
        f"    python -m pip download --no-deps --no-binary :all: peft=={version} -d {root}\n"
        f"(set PEFT_MASM_CACHE to move the cache; the sdist must match the installed peft {version})."
    )


def _download_sdist(version: str, root: Path) -> Path:
    found = sorted(root.glob(f"peft-{version}.tar.gz"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-q", f"peft=={version}", "-d", tmp,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpstreamTestsUnavailable(
                f"`{' '.join(command)}` failed: {exc}.\n{_how_to_fix(version, root)}"
            ) from exc
        archives = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not archives:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise UpstreamTestsUnavailable(
                f"Could not download PEFT {version}'s sdist (`{' '.join(command)}` exited {result.returncode}):\n"
                f"{tail}\n{_how_to_fix(version, root)}"
            )
        target = root / archives[0].name
        os.replace(archives[0], target)
        return target


def _extract_tests(archive: Path, version: str, root: Path) -> Path:
    destination = root / f"peft-{version}" / "tests"
    if (destination / "test_custom_models.py").is_file():
        return destination
    prefix = f"peft-{version}/tests/"
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        try:
            with tarfile.open(archive) as tar:
                members = [
                    m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())
                ]
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise UpstreamTestsUnavailable(
                f"{archive} is not a readable sdist ({exc}); delete it.\n{_how_to_fix(version, root)}"
            ) from exc
        extracted = Path(tmp) / prefix
        if not (extracted / "test_custom_models.py").is_file():
            raise UpstreamTestsUnavailable(
                f"{archive} has no tests/test_custom_models.py; PEFT {version}'s sdist layout changed and "
                "tests/peft_upstream needs updating."
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(extracted, destination)
    return destination


def fetch_upstream_tests(version: str | None = None) -> Path:
    """The directory holding PEFT ``version``'s ``tests/`` (default: the installed peft), downloading once."""
    version = version or peft_version()
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpstreamTestsUnavailable(
            f"Cannot create the cache {root}: {exc}.\n{_how_to_fix(version, root)}"
        ) from exc
    with _file_lock(root / ".lock"):
        archive = _download_sdist(version, root)
        return _extract_tests(archive, version, root)


def _top_level_imports(path: Path) -> set[str]:
    """The absolute modules a file imports at its top level (to import them before any stub exists)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _stub(name: str, attributes: Sequence[str]) -> types.ModuleType:
    module = types.ModuleType(
        name, f"Stub of the optional package {name!r}, present only while PEFT's tests import."
    )

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} is not installed; this upstream PEFT test needs it and should have been excluded."
        )

    for attribute in attributes:
        setattr(
            module, attribute, type(attribute, (), {"__init__": unavailable, "from_pretrained": unavailable})
        )
    return module


@contextlib.contextmanager
def _optional_import_stubs(module_names: set[str]) -> Iterator[None]:
    """Stub the OPTIONAL_IMPORTS that are missing, and only for the duration of the block.

    Everything else the upstream modules import is imported for real *before* the stubs appear, so no
    other code (transformers' availability checks, ...) can observe or cache them.
    """
    missing: dict[str, types.ModuleType] = {}
    for name, attributes in OPTIONAL_IMPORTS.items():
        try:
            module = importlib.import_module(name)
        except ImportError:
            missing[name] = _stub(name, attributes)
            continue
        for attribute in attributes:  # installed but too old: add what is missing to a private copy
            if not hasattr(module, attribute):
                missing[name] = _stub(name, attributes)
    for name in sorted(module_names - set(OPTIONAL_IMPORTS)):
        if name.split(".")[0] not in OPTIONAL_IMPORTS:
            importlib.import_module(name)
    saved = {name: sys.modules.get(name) for name in missing}
    sys.modules.update(missing)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_upstream(module_names: Sequence[str], version: str | None = None) -> dict[str, types.ModuleType]:
    """Import PEFT's test modules (e.g. ``["test_custom_models", "test_config"]``) as a private package.

    The package is named ``_peft_upstream_tests_<version>`` so it clashes with nothing; pytest rewrites
    its asserts, so upstream failures read like ours.
    """
    version = version or peft_version()
    tests_dir = fetch_upstream_tests(version)
    package = "_peft_upstream_tests_" + re.sub(r"\W", "_", version)
    if package not in sys.modules:
        pytest.register_assert_rewrite(package)
        module = types.ModuleType(package, f"PEFT {version}'s tests/, from its sdist in {tests_dir}")
        module.__path__ = [str(tests_dir)]
        sys.modules[package] = module
    wanted = {f"{package}.{name}" for name in module_names} - set(sys.modules)
    if wanted:
        needed: set[str] = set()
        for path in tests_dir.glob("*.py"):
            if f"{package}.{path.stem}" in wanted or path.stem.startswith("testing_"):
                needed |= _top_level_imports(path)
        try:
            with _optional_import_stubs(needed):
                for name in sorted(wanted):
                    importlib.import_module(name)
        except Exception as exc:
            for name in wanted:
                sys.modules.pop(name, None)
            raise UpstreamTestsUnavailable(
                f"Importing PEFT {version}'s tests from {tests_dir} failed: {type(exc).__name__}: {exc}"
            ) from exc
    return {name: sys.modules[f"{package}.{name}"] for name in module_names}


def _copy_function(function: Callable[..., Any], qualname: str, marks: list[Any]) -> Callable[..., Any]:
    copy = types.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__dict__.update(function.__dict__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = qualname
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    copy.pytestmark = marks
    return copy


def remap_test_class(
    base: type,
    name: str,
    *,
    case_lists: Mapping[int, Sequence[Any]],
    inline: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    keep: Sequence[str] = (),
    excluded: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> tuple[type | None, dict[str, str]]:
    """A subclass of upstream test class ``base`` that runs its generic tests over MASM cases.

    - ``case_lists`` maps ``id(upstream_case_list)`` to the MASM list replacing it in every
      ``parametrize`` mark that uses it (e.g. ``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``);
    - ``inline`` maps a test name to ``{argnames: values}``, replacing that parametrisation (an inline
      list of other methods' configs, or a case list the test needs in another form);
    - ``keep`` names unparametrised tests that are generic and run as they are;
    - ``excluded`` maps test names to the reason they must not run.

    Returns the class (None when nothing in it applies) and ``{test name: reason}`` for every test
    left out, including those that exercise only other PEFT methods.
    """
    inline = inline or {}
    excluded = excluded or {}
    namespace: dict[str, Any] = dict(attributes or {})
    left_out: dict[str, str] = {}
    collected = 0
    for attr in sorted(dir(base)):
        if not attr.startswith("test_") or not callable(getattr(base, attr)):
            continue
        function = getattr(base, attr)
        if attr in excluded:
            namespace[attr], left_out[attr] = None, excluded[attr]
            continue
        marks, remapped = [], False
        for mark in getattr(function, "pytestmark", []):
            if mark.name == "parametrize":
                argnames, values = mark.args[0], mark.args[1]
                if attr in inline and argnames in inline[attr]:
                    values, remapped = inline[attr][argnames], True
                elif id(values) in case_lists:
                    values, remapped = case_lists[id(values)], True
                mark = pytest.mark.parametrize(argnames, values, *mark.args[2:], **mark.kwargs).mark
            marks.append(mark)
        if remapped or attr in keep:
            namespace[attr] = _copy_function(function, f"{name}.{attr}", marks)
            collected += 1
        else:
            namespace[attr] = None
            left_out[attr] = "exercises only other PEFT methods: " + _methods_named(function)
    unknown = (set(excluded) | set(inline) | set(keep)) - {a for a in dir(base) if a.startswith("test_")}
    if unknown:
        raise UpstreamTestsUnavailable(
            f"{base.__name__} has no tests {sorted(unknown)} in this peft version; update tests/peft_upstream."
        )
    if not collected:
        return None, left_out
    namespace["upstream_class"] = base.__name__
    return type(name, (base,), namespace), left_out


def _methods_named(function: Callable[..., Any]) -> str:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return "(source unavailable)"
    names = sorted(set(re.findall(r"\b([A-Z]\w*Config)\b", source)) - {"PeftConfig", "MASMConfig"})
    return ", ".join(names) if names else "hard-coded, not parametrised over the method case lists"
