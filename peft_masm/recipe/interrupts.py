"""Ctrl-C (and the SIGTERM that ``accelerate launch`` sends its child) in the recipe: held while a file is being
written, so that no checkpoint, adapter or result is left half-written, and turned into one line, not a traceback."""

from __future__ import annotations

import gc
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

__all__ = ["interrupts_held", "run_interruptible", "written_whole"]

T = TypeVar("T")


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM) until the block is done, then raise ``KeyboardInterrupt`` if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


def run_interruptible(function: Callable[[], T]) -> T | None:
    """``function()``, with SIGTERM read as Ctrl-C; None if it was interrupted (a second Ctrl-C is ignored)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `accelerate launch` terminates its child
    try:
        return function()
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C cannot turn this into a traceback
    gc.collect()  # the run's frames are gone: its progress bar has closed on its own line
    return None


def written_whole(out_dir: Path, write: Callable[[Path], T]) -> T:
    """``write(scratch)`` into a scratch folder, whose files are moved into ``out_dir`` once all are written (Ctrl-C
    waits for the move): an interrupted write leaves the earlier files, never half of the new ones."""
    scratch = out_dir / ".tmp-results"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        result = write(scratch)
        with interrupts_held():
            for file in sorted(scratch.iterdir()):
                file.replace(out_dir / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result
