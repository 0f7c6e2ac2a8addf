"""What a report reads of a run's costs (``summary.json``'s ``costs`` and ``train_flops``), and the Pareto front.

Per model kind of a row (:attr:`Run.kinds`):

* ``student`` and ``cohort mean``: one student's cost (a cohort's students: their mean);
* ``ensemble``: the sum over the cohort's students (the ensemble runs every one of them; its latency is
  that of running them one after the other).

Training cost is the run's (``train_flops``, ``train_seconds``: every student, the teachers' forwards or
store reads, adapters, EMA copies) plus, for :data:`WITH_TEACHER` axes, the teachers' own training as
recorded in their run (``costs.teacher*.training_cost``; pretrained or given weights record none: 0 added,
which the report says). A teacher shared by several runs is counted in full for each: the realistic cost
of one comparison that trained its own teacher.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from typing import Any

from distillistic.experiments.results import Run, mapping, number

# --x key -> (axis label, what it reads)
AXES: dict[str, str] = {
    "params": "parameters",
    "flops": "inference FLOPs per image",
    "latency": "latency, batch 1, median (ms)",
    "train_flops": "training FLOPs (the teacher's own training included)",
    "train_seconds": "training time (s, the teacher's own training included)",
}
DEFAULT_AXIS = "train_flops"
WITH_TEACHER = ("train_flops", "train_seconds")


def _student_costs(run: Run) -> list[dict[str, Any]]:
    costs = mapping(run.summary.get("costs"))
    names = [n for n in run.students if not n.endswith("_ema")]
    return [c for c in (mapping(mapping(costs.get(n)).get("cost")) for n in names) if c]


def _model_value(cost: dict[str, Any], key: str) -> float | None:
    if key == "latency":
        value = mapping(cost.get("latency_ms")).get("median")
    elif key == "latency_p90":
        value = mapping(cost.get("latency_ms")).get("p90")
    elif key == "throughput":
        value = cost.get("throughput_images_per_second")
    else:
        value = cost.get(key)
    return float(value) if number(value) and math.isfinite(value) else None


def model_cost(run: Run, kind: str, key: str) -> float | None:
    """``key`` (params, flops, macs, latency, latency_p90, throughput) of ``kind``'s model(s) in ``run``."""
    values = [_model_value(c, key) for c in _student_costs(run)]
    present = [v for v in values if v is not None]
    if not present or len(present) != len(values):
        return None
    if kind != "ensemble":
        return statistics.fmean(present)
    if key == "throughput":  # every image goes through each member: their times add up
        return 1.0 / sum(1.0 / v for v in present) if all(present) else None
    return sum(present)


def teacher_training(run: Run, key: str) -> float | None:
    """The teachers' own recorded training ``key`` (train_flops, train_seconds) summed; None when none recorded."""
    costs = mapping(run.summary.get("costs"))
    values = [mapping(mapping(costs.get(n)).get("training_cost")).get(key)
              for n in costs if re.fullmatch(r"teacher\d*", str(n))]
    present = [float(v) for v in values if number(v)]
    return sum(present) if present else None


def run_cost(run: Run, kind: str, key: str) -> float | None:
    """The cost on axis ``key`` (one of :data:`AXES`, or macs/latency_p90/throughput) of ``kind`` in ``run``."""
    if key in WITH_TEACHER:
        own = run.summary.get(key)
        if not number(own):
            return None
        return float(own) + (teacher_training(run, key) or 0.0)
    return model_cost(run, kind, key)


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points ``(cost, score)`` are Pareto-optimal: no other point costs no more and scores no less, being
    strictly better in one. A point with a non-finite coordinate is never optimal (and dominates nothing)."""
    finite = [math.isfinite(c) and math.isfinite(s) for c, s in points]
    out = []
    for i, (c, s) in enumerate(points):
        dominated = any(finite[j] and c2 <= c and s2 >= s and (c2 < c or s2 > s)
                        for j, (c2, s2) in enumerate(points) if j != i)
        out.append(finite[i] and not dominated)
    return out


def si(value: float, digits: int = 3) -> str:
    """``6.72 G`` style: a number with an SI prefix (``–`` when not finite)."""
    if not math.isfinite(value):
        return "–"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}"
    return f"{value:.{digits}g}"
