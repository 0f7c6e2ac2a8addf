"""The report's comparison: each cell's costs, its place on the Pareto front and its paired difference to a reference.

:func:`entries` lists (cell, model kind) in the order of the report's tables; :func:`cost_columns` adds
the cost columns to ``results.csv``; :func:`comparison_section` writes the markdown table (costs,
Pareto mark on the chosen axis, paired differences in top-1 and ECE with 95 % bootstrap intervals and
Holm-corrected p values); :mod:`distillistic.experiments.pareto_plot` draws the figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distillistic.experiments import paired
from distillistic.experiments.cost_view import AXES, WITH_TEACHER, pareto, run_cost, si, teacher_training
from distillistic.experiments.results import Group, Run, mean_std, pm

MODEL_COSTS = ("params", "flops", "macs", "latency", "latency_p90", "throughput")


@dataclass
class Entry:
    """One row of the comparison: a cell seen as one model kind (student, cohort mean, ensemble)."""

    label: str
    kind: str
    group: Group

    @property
    def runs(self) -> list[Run]:
        return [r for r in self.group.runs if self.kind in r.kinds]

    def metric(self, key: str) -> Callable[[Run], float | None]:
        return lambda run: (run.metrics(self.kind, "test") or {}).get(key)

    def stat(self, fn: Callable[[Run], float | None]) -> tuple[float, float]:
        mean, std, _ = mean_std(fn(r) for r in self.runs)
        return mean, std

    def cost(self, key: str) -> tuple[float, float]:
        return self.stat(lambda run: run_cost(run, self.kind, key))


def entries(groups: Sequence[Group]) -> list[Entry]:
    """Every (cell, model kind) in the order of the report's tables."""
    return [Entry(g.label, kind, g) for g in groups for kind in dict.fromkeys(k for r in g.runs for k in r.kinds)]


def cost_columns(entry: Entry) -> dict[str, float]:
    """``results.csv``'s cost columns of one row (means over its runs; training cost also its std)."""
    row = {f"{key}_mean": entry.cost(key)[0] for key in MODEL_COSTS}
    for key in WITH_TEACHER:
        own = entry.stat(lambda run, k=key: run.summary.get(k))  # type: ignore[misc]
        row[f"method_{key}_mean"], row[f"method_{key}_std"] = own
        row[f"teacher_{key}_mean"] = entry.stat(lambda run, k=key: teacher_training(run, k))[0]  # type: ignore[misc]
        row[f"{key}_with_teacher_mean"], row[f"{key}_with_teacher_std"] = entry.cost(key)
    return row


def pareto_marks(items: Sequence[Entry], axis: str, metric: str = "top1") -> list[bool]:
    """Which rows are Pareto-optimal on (mean ``axis`` cost, mean test ``metric``; ECE: lower is better)."""
    sign = -1.0 if metric == "ece" else 1.0
    return pareto([(e.cost(axis)[0], sign * e.stat(e.metric(metric))[0]) for e in items])


def paired_rows(items: Sequence[Entry], groups: Sequence[Group], reference: str,
                metric: str) -> dict[int, paired.Paired]:
    """Each row's (by index) paired difference in test ``metric`` to its reference cell (seen as its first
    model kind: a baseline's student), Holm-corrected over the compared rows."""
    chosen = paired.choose_reference(groups, reference)
    index = {id(g): i for i, g in enumerate(groups)}
    out: dict[int, paired.Paired] = {}
    for i, e in enumerate(items):
        ref = chosen.get(index[id(e.group)])
        if ref is None:
            continue
        a, b = paired.pairs(e.group, ref, e.metric(metric),
                            lambda run: (run.metrics(run.kinds[0], "test") or {}).get(metric))
        out[i] = paired.differences(a, b)
        out[i].label = ref.label  # what it was compared with
    paired.holm_fill(out.values())
    return out


def _difference(result: paired.Paired | None, is_reference: bool, several: bool) -> list[str]:
    """A row's Δ and p cells; ``several``: more than one cell bears the reference's name, so say which one."""
    delta, p = paired.columns(result, is_reference)
    return [delta + (f" (vs {result.label})" if result is not None and several else ""), p]


def comparison_section(groups: Sequence[Group], axis: str, reference: str) -> list[str]:
    """The markdown of the report's comparison: costs, Pareto mark, paired differences to ``reference``."""
    items = entries(groups)
    marks = pareto_marks(items, axis)
    diffs = {m: paired_rows(items, groups, reference, m) for m in ("top1", "ece")}
    refs = paired.named(groups, reference)
    several = len(refs) > 1
    head = ["cell", "model", "n", "top-1 (%)", "ECE (%)", "params", "FLOPs/img", "latency ms p50 / p90",
            "train FLOPs (method)", "teacher's own training FLOPs", "train s (method)", f"Pareto ({axis})",
            f"Δ top-1 vs {reference} (pp) [95 % CI]", "p (Holm)", f"Δ ECE vs {reference} (pp) [95 % CI]", "p (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, (e, optimal) in enumerate(zip(items, marks)):
        lat, p90 = e.cost("latency")[0], e.cost("latency_p90")[0]
        teacher = e.stat(lambda run: teacher_training(run, "train_flops"))[0]
        cells = [e.label, e.kind, str(len(e.runs)), pm(*e.stat(e.metric("top1")), 100.0),
                 pm(*e.stat(e.metric("ece")), 100.0), si(e.cost("params")[0]), si(e.cost("flops")[0]),
                 f"{lat:.3f} / {p90:.3f}" if math.isfinite(lat) and math.isfinite(p90) else "–",
                 si(e.stat(lambda run: run.summary.get("train_flops"))[0]), si(teacher),
                 pm(*e.stat(lambda run: run.summary.get("train_seconds")), 1.0, 1), "◆" if optimal else ""]
        for m in ("top1", "ece"):
            cells += _difference(diffs[m].get(i), any(e.group is g for g in refs), several)
        lines.append("| " + " | ".join(cells) + " |")
    return [f"## Comparison: costs, Pareto front ({AXES[axis]}), paired differences to `{reference}`", "",
            *lines, "", *_legend(axis, reference, items, diffs), ""]


def _legend(axis: str, reference: str, items: Sequence[Entry],
            diffs: dict[str, dict[int, paired.Paired]]) -> list[str]:
    text = [f"◆: Pareto-optimal in mean test top-1 against {AXES[axis]} (no other row is as cheap and as accurate, "
            "being better in one). Costs: a cohort mean's row is one student's, an ensemble's the sum of its "
            "students'. FLOPs count matrix products and convolutions (torch.utils.flop_counter.FlopCounterMode); "
            "the teacher's own training is its cached run's, counted in full for every run that used it.", ""]
    if not any(math.isfinite(e.cost(axis)[0]) for e in items):
        text += [f"No run recorded its {AXES[axis]} (summaries written before costs were recorded): no Pareto "
                 "mark and no Pareto figure.", ""]
    if not any(diffs["top1"].values()):
        text.append(f"No paired differences: no cell named `{reference}` (variant, label or algorithm) shares "
                    "seeds with the others; pass `--reference NAME`.")
    else:
        text.append(f"Δ: the cell minus `{reference}` (same seeds, paired run by run); 95 % interval: "
                    f"scipy.stats.bootstrap (percentile, {paired.RESAMPLES:,d} resamples) of the mean paired "
                    f"difference; p: {paired.TEST_NAME}, one family per metric. ✱: the interval excludes 0. "
                    "With 3 seeds a bootstrap has 10 distinct resamples: read the interval as coarse.")
    return text


def pareto_caption(axis: str) -> str:
    return f"Pareto front: test top-1 and ECE against {AXES[axis]}"
