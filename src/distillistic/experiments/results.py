"""Runs read back and the small helpers every view of them shares (report tables, plots, the demo).

A :class:`Run` is one run directory read (resolved config, summary, metric rows); a :class:`Group` is a
cell: the runs of one config up to the seeds. :func:`minimal_labels` names cells by the fewest keys that
tell them apart; :func:`mean_std` and :func:`pm` are the statistics and their text.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from distillistic.experiments.grid import value_text

# When several keys tell cells apart equally well, the label names the first of these.
LABEL_PRIORITY = ("variant", "algo", "virtual_smooth", "model", "teacher", "student_resolution", "temperature", "alpha",
                  "students", "divergence", "dataset", "teacher_weights", "epochs", "lr", "batch_size")


def mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else an empty one: a malformed field of a summary reads as missing."""
    return value if isinstance(value, dict) else {}


def number(value: Any) -> TypeGuard[int | float]:
    """Whether ``value`` is a real number (not a bool, a string or a list from a malformed summary)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Run:
    """One run directory, read: its resolved config, summary and per-epoch metric rows."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cohort(self) -> bool:
        return "cohort_mean" in self.summary

    @property
    def students(self) -> list[str]:
        return [m for m in mapping(self.summary.get("models")) if isinstance(m, str) and m.startswith("student")]

    @property
    def kinds(self) -> list[str]:
        return ["cohort mean", "ensemble"] if self.cohort else ["student"]

    def metrics(self, kind: str, part: str) -> dict[str, Any] | None:
        """Test metrics of ``kind`` (student, cohort mean, ensemble) at ``part`` (test, test_last)."""
        if kind == "cohort mean":
            return mapping(mapping(self.summary.get("cohort_mean")).get(part)) or None
        name = "ensemble" if kind == "ensemble" else "student"
        return mapping(mapping(mapping(self.summary.get("models")).get(name)).get(part)) or None

    def best_epoch(self) -> float | None:
        models = mapping(self.summary.get("models"))
        epochs = [mapping(mapping(models.get(s)).get("val_best")).get("epoch") for s in self.students]
        present = [float(e) for e in epochs if number(e)]
        return statistics.fmean(present) if present else None


@dataclass
class Group:
    """The runs of one cell (same config up to the seeds)."""

    settings: dict[str, Any]
    runs: list[Run]
    label: str = ""

    @property
    def seeds(self) -> str:
        return ",".join(str(r.config.get("seed")) for r in self.runs)


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, int | float):
        return (2, float(value))
    return (3, str(value))


def varying_keys(items: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for item in items for k in item))
    return [k for k in keys if len({_text(item.get(k)) for item in items}) > 1]


def minimal_labels(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label per item naming the fewest keys that tell different items apart (``algo=kd, temperature=4``)."""
    varying = varying_keys(items)
    rank = {k: i for i, k in enumerate(LABEL_PRIORITY)}
    varying.sort(key=lambda k: rank.get(k, len(rank)))
    distinct = len({_text(dict(item)) for item in items})
    chosen: list[str] = []
    while len({_text([item.get(k) for k in chosen]) for item in items}) < distinct:
        def splits(k: str) -> int:
            return len({_text([item.get(c) for c in [*chosen, k]]) for item in items})
        best = max((k for k in varying if k not in chosen), key=splits)  # max keeps the first (priority) on ties
        chosen.append(best)
    if not chosen:
        return [f"algo={item.get('algo')}" for item in items]
    chosen.sort(key=lambda k: rank.get(k, len(rank)))  # read in a fixed order: the algorithm first
    labels = []
    for item in items:
        # After the first key, name a key only where it tells this item from one that shares the first
        # key's value: "algo=kd" stays short while "algo=tfkd, virtual_smooth=true" needs its second key.
        peers = [o for o in items if _text(o.get(chosen[0])) == _text(item.get(chosen[0]))]
        keys = [chosen[0], *(k for k in chosen[1:] if len({_text(o.get(k)) for o in peers}) > 1)]
        labels.append(", ".join(str(item.get(k)) if k == "variant" else f"{k}={value_text(item.get(k))}"
                                for k in keys))
    return labels


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; NaN for one value) and n of the finite values."""
    kept = [float(v) for v in values if number(v) and math.isfinite(v)]
    if not kept:
        return math.nan, math.nan, 0
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else math.nan, len(kept)


def pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (just the mean when there is one run; ``–`` when there is none)."""
    if not math.isfinite(mean):
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if not math.isfinite(std) else f"{text} ± {scale * std:.{digits}f}"
