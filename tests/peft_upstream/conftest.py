"""Per-parameter exclusions and known failures for the upstream PEFT tests in this directory.

A test module here may define, keyed by ``(upstream class, test name)`` with values
``(predicate(params) -> bool, reason)``:
- ``UPSTREAM_EXCLUDED_CASES``: matching items do not apply to MASM and are deselected (pytest
  reports them as "deselected");
- ``UPSTREAM_KNOWN_FAILURES``: matching items fail because of a known MASM tuner bug and are marked
  ``xfail(strict=True)``, so the suite stays green, the list stays visible, and a fix makes them
  XPASS, which fails the run until the entry is removed.

And keyed the same way with values ``(predicate(params) -> bool, lr, reason)``:
- ``UPSTREAM_SGD_LR``: matching items build their ``torch.optim.SGD`` at ``lr`` instead of upstream's
  value, as upstream itself lowers it per method (DoRA, OSF, AdaLoRA, ...); an item that then builds
  no SGD at all fails, so an entry cannot silently stop applying.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch


def _rule(item: pytest.Item, table: str) -> tuple[Any, ...] | None:
    """The entry of the test module's ``table`` that applies to ``item`` (its predicate holds), if any."""
    rules = getattr(getattr(item, "module", None), table, None)
    cls = getattr(item, "cls", None)
    if not rules or cls is None:
        return None
    key = (getattr(cls, "upstream_class", cls.__name__), getattr(item, "originalname", item.name))
    callspec = getattr(item, "callspec", None)
    rule = rules.get(key)
    return rule if rule is not None and rule[0](callspec.params if callspec is not None else {}) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        if _rule(item, "UPSTREAM_EXCLUDED_CASES") is not None:
            deselected.append(item)
            continue
        failure = _rule(item, "UPSTREAM_KNOWN_FAILURES")
        if failure is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=failure[1]))
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch: pytest.MonkeyPatch):
    """Offline and one torch thread, for the tests in this directory only.

    PEFT's save_pretrained asks the Hub whether ``base_model_name_or_path`` ("MLP", "TinyViT") has a
    config.json; HF_HUB_OFFLINE=1 makes it skip that lookup instead of waiting for DNS. The tensors are
    tiny, so one intra-op thread per xdist worker avoids oversubscribing the cores.
    """
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _upstream_sgd_lr(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For items matched by the module's ``UPSTREAM_SGD_LR``: every ``torch.optim.SGD`` the test builds uses that
    entry's learning rate (see the module docstring)."""
    rule = _rule(request.node, "UPSTREAM_SGD_LR")
    if rule is None:
        yield
        return
    lr, built = rule[1], []

    class SGDAtMASMRate(torch.optim.SGD):
        def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("lr", None)
            super().__init__(params, lr, *args[1:], **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "SGD", SGDAtMASMRate)
    yield
    if not built:
        pytest.fail(
            f"UPSTREAM_SGD_LR lowers the SGD learning rate of {request.node.name}, but it built no torch.optim.SGD: "
            "upstream changed the test; update or remove the entry."
        )
