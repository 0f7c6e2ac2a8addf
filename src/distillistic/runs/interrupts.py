"""A stage with nothing to checkpoint (setup, the final evaluation) stops cleanly on SIGTERM instead of being
killed mid-write: the signal becomes a KeyboardInterrupt, which the run's own handling turns into exit 130/143."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from distillistic.runs.rundir import note_stop_signal


@contextlib.contextmanager
def interrupt_on_sigterm(also_sigint: bool = False) -> Iterator[None]:
    """While inside, SIGTERM (and SIGINT, which Python already maps) raises KeyboardInterrupt at once: a
    stage with nothing to checkpoint (setup, the final evaluation) stops cleanly instead of being killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGTERM, *([signal.SIGINT] if also_sigint else [])]
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        note_stop_signal(signum)
        raise KeyboardInterrupt

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
