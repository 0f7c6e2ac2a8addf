"""File locks that say who holds them: a run directory, a teacher being trained, the teacher store, a sweep cell.

Every lock is an ``fcntl.flock`` on a small file: the system releases it when its process ends, even killed,
so a lock is never left behind by a dead process on a local disk. Whoever takes a lock writes into the file
who it is (process id, host, since when, command line), so that a process that has to wait, or is refused,
can say which process it waits for and how to end it if that process hangs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from distillistic.fileio import pid_alive

log = logging.getLogger("distillistic")


def note_holder(handle: IO[str]) -> None:
    """Write this process's identity into the lock file it has just locked (replacing an earlier holder's)."""
    note = {"pid": os.getpid(), "host": platform.node(), "since": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join(["distillistic", *sys.argv[1:]])[:200]}
    try:
        os.ftruncate(handle.fileno(), 0)
        handle.seek(0)
        handle.write(json.dumps(note) + "\n")
        handle.flush()
    except OSError:  # a lock file that cannot be written still locks; only the note is lost
        pass


def holder_of(path: Path) -> tuple[str, int | None]:
    """Who holds the lock ``path``, as its holder noted it (``process 123 on host h since T (command)``), and
    its process id (``None`` when it left no note)."""
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        note = json.loads(lines[-1]) if lines else None  # the last note: its holder's
    except (OSError, ValueError):
        note = None
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int) or (
            note.get("host") == platform.node() and not pid_alive(note["pid"])):  # a note an ended process left
        return "a process that left no note of itself", None
    text = f"process {note['pid']} on {note.get('host') or 'an unnamed host'} since {note.get('since') or '?'}"
    return text + (f" ({note['command']})" if note.get("command") else ""), note["pid"]


def how_to_break(pid: int | None) -> str:
    """How to end a lock whose holder hangs: stop the process; the system releases its lock."""
    stop = f"kill {pid}" if pid is not None else "stop it"
    return f"if that process hangs, {stop}: the system then releases its lock (there is no file to delete)"


def try_lock(handle: IO[str], note: bool = True) -> bool:
    """Take the lock on ``handle`` without waiting; ``False`` if it is held. ``note``: note this process as its
    holder now (else later, :func:`note_holder`, once it writes anyway: a refused run leaves the file as it was)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    if note:
        note_holder(handle)
    return True


def wait_lock(handle: IO[str], path: Path, what: str) -> None:
    """Take the lock on ``handle`` (the open file ``path``), waiting for its holder if need be; before waiting
    say, in one line, what for, who holds it and how to break it if that holder hangs."""
    if try_lock(handle):
        return
    holder, pid = holder_of(path)
    log.info("waiting for %s: '%s' is held by %s; %s", what, path, holder, how_to_break(pid))
    fcntl.flock(handle, fcntl.LOCK_EX)
    note_holder(handle)
