"""The package version, in one place (``pyproject.toml`` reads it from here; saved into every adapter_config.json)."""

__version__ = "0.3.0.dev0"
