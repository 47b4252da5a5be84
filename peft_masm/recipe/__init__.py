"""The training recipe behind ``recipes/train.py``, less its training loop: ``config`` (the typed ``TrainConfig``
from YAML and the command line), ``data`` (its datasets), ``checkpoints`` (output folder, checkpoints, rotation,
resume), ``tracking`` (``metrics.jsonl``), ``interrupts`` (Ctrl-C) and ``run`` (the command line's exit codes)."""
