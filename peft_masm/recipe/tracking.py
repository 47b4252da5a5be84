"""The recipe's trackers: ``metrics.jsonl`` (a dependency-free accelerate tracker) and the check that every
``report_to`` name is one accelerate knows and can load."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker

__all__ = ["METRICS_FILE", "OWN_TRACKERS", "JSONLTracker", "make_trackers", "tracker_problem"]

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"  # the tracker's copy of the run's configuration
OWN_TRACKERS = ("json", "jsonl", "none")  # written by the recipe itself, no package needed


class JSONLTracker(GeneralTracker):
    """One JSON object per ``log`` call in ``metrics.jsonl``; the configuration in ``run_config.json``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(logging_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        (self.path.parent / RUN_CONFIG_FILE).write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        row: dict[str, Any] = {"step": step}
        row.update(
            {k: float(v) if isinstance(v, (int, float, torch.Tensor)) else v for k, v in values.items()}
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        pass


def make_trackers(report_to: list[str], output_dir: str) -> list[Any]:
    """``Accelerator(log_with=...)`` for ``report_to``: the JSONL tracker (writing in ``output_dir``) and
    accelerate's by name."""
    out: list[Any] = []
    for name in report_to:
        if name in ("json", "jsonl"):
            out.append(JSONLTracker("masm", output_dir))
        elif name != "none":
            out.append(name)  # tensorboard, wandb, ... (checked installed when the config was read)
    return out


def tracker_problem(names: list[str]) -> str | None:
    """What is wrong with ``report_to`` (a name accelerate does not know, or whose package is missing), or None.

    accelerate itself only warns and drops a missing tracker, so a run would end without its logs.
    """
    import accelerate.utils
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    for name in (n for n in names if n not in OWN_TRACKERS):
        if name not in known:
            valid = [*OWN_TRACKERS, *known]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return f"report_to: unknown tracker {name!r}.{hint} Known: {', '.join(valid)}."
        if not getattr(accelerate.utils, f"is_{name}_available", lambda: True)():
            return (
                f"report_to: {name} is not installed; `pip install {name}`, or log without it "
                "(--report_to json)."
            )
    return None
