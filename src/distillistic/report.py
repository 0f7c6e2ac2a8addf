"""Aggregating run directories into tables."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

METRICS = ("top1", "top5", "ece", "nll", "brier", "entropy")


def read_summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is missing or unreadable ({type(e).__name__}); is '{run}' a finished run?") from None


def student_metrics(summary: Mapping[str, Any], part: str = "test") -> dict[str, float] | None:
    """The students' metrics of a run: the single student's, or the cohort's mean over its students."""
    if "cohort_mean" in summary:
        return summary["cohort_mean"].get(part)
    entry = summary["models"].get("student", {})
    return entry.get(part)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_runs(groups: Mapping[str, Sequence[Path]], part: str = "test") -> list[dict[str, Any]]:
    """One row per group of runs (e.g. one algorithm over seeds): mean and std of each metric."""
    rows = []
    for label, runs in groups.items():
        metrics = [m for m in (student_metrics(read_summary(r), part) for r in runs) if m]
        row: dict[str, Any] = {"label": label, "n": len(metrics)}
        for key in METRICS:
            row[key], row[f"{key}_std"] = mean_std([m[key] for m in metrics if key in m])
        rows.append(row)
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: algorithm, test top-1 mean ± std, ECE, NLL, entropy (cohorts: mean over students)."""
    lines = ["| algorithm | n | test top-1 | ECE | NLL | entropy |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} | {100 * r['top1']:.2f} ± {100 * r['top1_std']:.2f} % | "
                     f"{r['ece']:.4f} ± {r['ece_std']:.4f} | {r['nll']:.3f} | {r['entropy']:.3f} |")
    return "\n".join(lines)
