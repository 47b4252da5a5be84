"""The command line of ``recipes/train.py``: ``--help``; ``--config`` and ``--key value`` overrides read into a
:class:`~peft_masm.recipe.config.TrainConfig`; one line on stderr and exit code 2 for a bad configuration, data,
backbone or Hub setting; one line and exit code 130 for Ctrl-C; the list of outputs at the end."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .checkpoints import TrainState, interrupted_message
from .config import ConfigError, RecipeArgumentParser, format_help, parse_args
from .interrupts import run_interruptible

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "is_main_process", "main", "user_errors"]

EXIT_USAGE = 2  # a bad configuration, data, backbone or Hub setting (argparse's code for a usage error)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

TrainingFunction = Callable[[Any, TrainState], dict[str, Any]]


def main(training_function: TrainingFunction, argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run ``training_function(cfg, state)``; the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        return 0
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        print(RecipeArgumentParser().format_usage().rstrip(), file=sys.stderr)
        print(
            "error: --config is required (examples in recipes/configs/; --help lists every field)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    state = TrainState()
    try:
        cfg = parse_args(argv)
        summary = run_interruptible(lambda: training_function(cfg, state))
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # while the config is read (run_interruptible reports one during the run)
        print("interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary is None:
        if is_main_process():
            print(interrupted_message(cfg, state), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not summary.get("stopped_early") and "adapter_dir" in summary and is_main_process():
        print_summary(summary)
    return 0


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that are a user's mistake (configuration, data, backbone, Hub): one line and exit code 2."""
    from ..data import DataError
    from ..detector import BackboneNotAvailableError
    from ..hub import AdapterPushError

    return (ConfigError, DataError, BackboneNotAvailableError, AdapterPushError, FileNotFoundError)


def is_main_process() -> bool:
    """Rank 0 of a launched run (or no launcher), from the environment: no process group needed."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def print_summary(summary: dict[str, Any]) -> None:
    print("\nDone. Outputs:")
    print(f"  adapter (best on validation, with model card): {summary['adapter_dir']}")
    labels = {
        "results_json": "results",
        "results_md": "results table",
        "roc_plot": "ROC plot",
        "mask_plot": "layer-mask heatmap",
        "hub_commit": "Hub commit",
    }
    for key, label in labels.items():
        if key in summary:
            print(f"  {label}: {summary[key]}")
