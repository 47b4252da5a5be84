"""pyproject.toml as setuptools reads it when the package is installed (issue 26 item 11)."""

from __future__ import annotations

import warnings
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_reads_without_deprecation_and_names_the_licence():
    """``license = { text = ... }`` printed setuptools' "`project.license` as a TOML table is deprecated" at every
    install; an SPDX expression is what setuptools >= 77 reads instead."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), PYPROJECT)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, SetuptoolsDeprecationWarning)]
    assert deprecated == []
    assert dist.metadata.license_expression == "Apache-2.0"
