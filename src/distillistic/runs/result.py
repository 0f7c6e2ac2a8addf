"""What ``distillistic.train`` returns: the run's folder, config and summary, with typed test scores that print
as the tables do (top-1 and ECE in %, NLL), and the API's own voice (its lines through ``logging``)."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillistic.config import Config

log = logging.getLogger("distillistic")


@dataclass(frozen=True)
class Score:
    """A model's test metrics at its best-on-val epoch; fractions, printed in % as every table prints them."""

    model: str
    top1: float
    ece: float
    nll: float

    def __str__(self) -> str:
        return f"{self.model}: test top-1 {100 * self.top1:.2f} %, ECE {100 * self.ece:.2f} %, NLL {self.nll:.3f}"


def _score(name: str, entry: Any) -> Score | None:
    test = entry.get("test") if isinstance(entry, dict) else None
    if not isinstance(test, dict) or not isinstance(test.get("top1"), float):
        return None
    return Score(name, test["top1"], float(test.get("ece", math.nan)), float(test.get("nll", math.nan)))


@dataclass
class RunResult:
    """``out`` (the run directory), ``config`` (resolved), ``summary`` (``summary.json``'s content)."""

    out: Path
    config: Config
    summary: dict[str, Any]

    @property
    def scores(self) -> dict[str, Score]:
        """Every evaluated model's test score (students, ensemble, teacher, EMA copies), by name."""
        models = self.summary.get("models") or {}
        found = {name: _score(name, entry) for name, entry in models.items()}
        return {name: s for name, s in found.items() if s is not None}

    @property
    def student(self) -> Score | None:
        """The student's score; a cohort's mean over its students (``cohort mean``); None if not finished."""
        if "cohort_mean" in self.summary:
            return _score("cohort mean", self.summary["cohort_mean"])
        return self.scores.get("student")

    def __str__(self) -> str:
        status = self.summary.get("status")
        if status != "completed":
            return f"{self.out}: {status} ({self.summary.get('reason', '')})"
        shown = [*([self.student] if "cohort_mean" in self.summary else []), *self.scores.values()]
        return "\n".join([f"{self.out}:", *(f"  {s}" for s in shown if s is not None)])


def api_voice() -> None:
    """Let a run started from Python talk as the CLI does (stderr, one line each), unless the program has set up
    logging itself; silence it as the CLI's ``--quiet`` does, or with
    ``logging.getLogger("distillistic").setLevel(logging.WARNING)``."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
