"""Progress lines on the ``distillistic`` logger, prefixed inside a nested run (``teacher:``).

A leaf of the training layer (the engine's progress bar and :mod:`distillistic.runs.talk` use it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("distillistic")
_PREFIX: list[str] = []


@contextlib.contextmanager
def prefixed(name: str) -> Iterator[None]:
    """Prefix every line of the runs started inside with ``name:`` (the teacher trained first)."""
    _PREFIX.append(name)
    try:
        yield
    finally:
        _PREFIX.pop()


def prefix() -> str:
    """``"teacher: "`` inside :func:`prefixed`, else ``""``."""
    return "".join(f"{p}: " for p in _PREFIX)


def say(message: str, *args: Any) -> None:
    """One progress line (prefixed) on the ``distillistic`` logger."""
    log.info(prefix() + message, *args)


