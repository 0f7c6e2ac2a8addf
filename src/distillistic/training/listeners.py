"""Epoch listeners: code around a run (a tuner) is told each epoch's metric rows, with no hook in the loop for it.

``with on_epoch(fn): train(cfg)`` calls ``fn(cfg, epoch, rows)`` after every epoch's validation and checkpoint,
for every run trained inside the block (a teacher trained first too: ``cfg.out`` tells them apart). A listener
may raise to stop the run there (a pruned trial); the run's directory keeps its last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from distillistic.config import Config

EpochListener = Callable[[Config, int, list[dict[str, Any]]], None]

_listeners: ContextVar[tuple[EpochListener, ...]] = ContextVar("distillistic_epoch_listeners", default=())


@contextmanager
def on_epoch(listener: EpochListener) -> Iterator[None]:
    """Call ``listener(cfg, epoch, rows)`` after every epoch of the runs trained inside this block."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def notify_epoch(cfg: Config, epoch: int, rows: list[dict[str, Any]]) -> None:
    """Tell every listener that epoch ``epoch`` (1-based) of the run ``cfg`` ended with ``rows``."""
    for listener in _listeners.get():
        listener(cfg, epoch, rows)
