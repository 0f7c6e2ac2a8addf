"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, a mismatched checkpoint) raises
:class:`UserError` with one sentence that names the problem and the fix. The CLI prints it as
``distillistic: error: <message>`` and exits with code 2, without a traceback. Bugs stay ordinary
exceptions so that they keep their traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem in the user's input, reported as one line and exit code 2."""


class ConfigError(UserError):
    """A config key has a value that is not allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {short_repr(value)} is not allowed: {allowed}")


def shown(path: str | os.PathLike[str]) -> str:
    """A path as distillistic prints it: always absolute (``~`` expanded, ``..`` folded), so that a run's folder,
    a cached teacher and a report read the same way wherever they lie. Commands printed for the user to run
    again keep the user's own spelling."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a fuzzed 5000-digit number must not flood the message)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (Python's 4300-digit limit)
        return f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DataError(UserError):
    """A dataset is missing, empty, truncated or corrupt."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, unsafe or does not match the model or dataset."""


class TrainingDiverged(Exception):
    """The loss became NaN or inf; the run stops and records why in ``summary.json``."""


class TeacherStopped(Exception):
    """A teacher trained first stopped before completing (a signal): the distillation must not start on it."""

    def __init__(self, reason: str, folder: object) -> None:
        self.reason, self.folder = reason, folder
        super().__init__(f"the teacher's training (trained first into '{folder}') {reason}")


def one_line(error: BaseException) -> str:
    """The last line of an error's message (DataLoader workers re-raise with their traceback prepended)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(prefix)
