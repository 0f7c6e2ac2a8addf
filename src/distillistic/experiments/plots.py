"""Figures of a report (matplotlib, Agg canvas; no display needed).

- ``learning_curves.png``: validation top-1 and ECE per epoch, one line per cell (mean over seeds, band ±1 std);
- ``reliability.png``: reliability diagrams on the test split at the best-on-val epoch, runs and cohort
  students pooled per bin, each bin shaded by its samples, over- and under-confident gaps told apart, with the
  samples per bin beneath on a log axis (:mod:`distillistic.experiments.reliability_panel`);
- ``vs_<key>.png`` for every swept numeric axis (student image size, temperature, α, …): test top-1, ECE,
  entropy and training time against it, one line per algorithm, error bars ±1 std over seeds.

When the runs sweep a numeric axis, the learning curves and reliability diagrams get one column or row
per value of the first such axis, so that every panel compares algorithms at one setting.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from distillistic.experiments.reliability_panel import draw_panel, legend_handles, pooled_bins
from distillistic.experiments.results import Group, mean_std, minimal_labels, number, varying_keys

AXES: dict[str, tuple[str, str]] = {  # key -> (name, unit) on plot axes and facet titles
    "student_resolution": ("student input size", "px"), "teacher_resolution": ("teacher input size", "px"),
    "image_size": ("input size", "px"), "temperature": ("temperature T", ""), "alpha": ("distillation weight α", ""),
    "students": ("students in the cohort", ""), "epochs": ("training epochs", ""), "lr": ("peak learning rate", ""),
    "batch_size": ("batch size", "images"), "max_train_samples": ("training set size", "images"),
    "virtual_p": ("virtual teacher's p", ""), "alpha_warmup": ("α warm-up", "share of epochs"),
    "weight_decay": ("weight decay", ""), "teacher_epochs": ("teacher epochs", ""),
    "imbalance_share": ("share of the imbalanced class", ""),
}


def axis_label(key: str) -> str:
    name, unit = AXES.get(key, (key, ""))
    return f"{name} ({unit})" if unit else name


def facet_title(key: str, value: Any) -> str:
    name, unit = AXES.get(key, (key, ""))
    return f"{name}: {_fmt(value)}{' ' + unit if unit else ''}"


PANELS = (("top1", "test top-1 accuracy (%)", 100.0), ("ece", "test ECE (%, 15 bins)", 100.0),
          ("entropy", "mean predictive entropy (nats)", 1.0), ("train_seconds", "training time (s)", 1.0))


@dataclass
class Panel:
    """One cell as drawn in a facet: its series label (what tells it from the others in the facet) and runs."""

    facet: str
    label: str
    group: Group


# --- what to draw -----------------------------------------------------------------------------------------


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def axis_value(settings: dict[str, Any], key: str) -> Any:
    """A key's value on a plot axis; an unset resolution means the full input size."""
    value = settings.get(key)
    if value is None and key in ("student_resolution", "teacher_resolution"):
        return settings.get("image_size")
    return value


def _determined_by(groups: Sequence[Group], key: str, axis: str) -> bool:
    """True when ``key`` has one value per value of ``axis`` (e.g. the batch size that fits a student size)."""
    seen: dict[Any, str] = {}
    for g in groups:
        x, value = axis_value(g.settings, axis), repr(g.settings.get(key))
        if seen.setdefault(x, value) != value:
            return False
    return True


def series_settings(groups: Sequence[Group], axis: str) -> list[dict[str, Any]]:
    """Each cell's settings without the axis and the numeric keys tied to it: what one line shares."""

    tied = {k for k in varying_keys([g.settings for g in groups])
            if k != axis and all(_numeric(g.settings.get(k)) for g in groups) and _determined_by(groups, k, axis)}
    return [{k: v for k, v in g.settings.items() if k != axis and k not in tied} for g in groups]


def swept_axes(groups: Sequence[Group]) -> list[str]:
    """Numeric keys along which at least one line (cells equal apart from the axis) has two or more points."""

    axes = []
    for key in varying_keys([g.settings for g in groups]):
        if key == "image_size" or not all(_numeric(axis_value(g.settings, key)) for g in groups):
            continue
        lines: dict[str, set[Any]] = {}
        for g, s in zip(groups, series_settings(groups, key)):
            lines.setdefault(repr(sorted(s.items())), set()).add(axis_value(g.settings, key))
        if any(len(xs) > 1 for xs in lines.values()):
            axes.append(key)
    return axes


def panels(groups: Sequence[Group], axis: str | None) -> list[Panel]:
    """Every cell as a :class:`Panel`: facets are the axis' values, labels what differs within a facet."""

    if axis is None:
        return [Panel("", g.label, g) for g in groups]
    labels = minimal_labels(series_settings(groups, axis))
    ordered = sorted(zip(groups, labels), key=lambda p: axis_value(p[0].settings, axis))
    return [Panel(facet_title(axis, axis_value(g.settings, axis)), label, g) for g, label in ordered]


def _fmt(value: Any) -> str:
    return format(value, "g") if _numeric(value) else str(value)


# --- data per cell -----------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:

    mean, std, _ = mean_std(values)
    return mean, std


def curves(group: Group, metric: str) -> tuple[list[int], list[float], list[float]]:
    """Validation ``metric`` per epoch: mean and std over runs of the students' (cohort: mean) value."""
    per_epoch: dict[int, list[float]] = {}
    for run in group.runs:
        by_epoch: dict[int, list[float]] = {}
        for row in run.history:
            if row.get("split") == "val" and row.get("model") in run.students and row.get(metric) is not None:
                by_epoch.setdefault(int(row["epoch"]), []).append(float(row[metric]))
        for epoch, values in by_epoch.items():
            per_epoch.setdefault(epoch, []).append(sum(values) / len(values))
    epochs = sorted(per_epoch)
    stats = [_stats(per_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


# --- drawing ------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    unique = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(unique)}


def _styles(labels: Sequence[str]) -> dict[str, str]:
    """A line style per series as well as a colour: lines that coincide (DML and DML_e do) stay visible."""
    return {label: ("-", "--", "-.", ":")[i % 4] for i, label in enumerate(dict.fromkeys(labels))}


def _facets(items: Sequence[Panel]) -> list[tuple[str, list[Panel]]]:
    out: dict[str, list[Panel]] = {}
    for p in items:
        out.setdefault(p.facet, []).append(p)
    return list(out.items())


def learning_curves(items: Sequence[Panel], path: Path) -> Path:
    facets, colors, styles = _facets(items), _colors([p.label for p in items]), _styles([p.label for p in items])
    fig = Figure(figsize=(max(9.0, 1.0 + 4.6 * len(facets)), 7.5), layout="constrained")
    axes = fig.subplots(2, len(facets), squeeze=False, sharex=True, sharey="row")
    for col, (facet, members) in enumerate(facets):
        for row, (metric, ylabel) in enumerate((("top1", "val top-1 accuracy (%)"), ("ece", "val ECE (%, 15 bins)"))):
            ax: Axes = axes[row][col]
            for p in members:
                epochs, mean, std = curves(p.group, metric)
                m = [100 * v for v in mean]
                ax.plot(epochs, m, marker="o", ms=3, color=colors[p.label], ls=styles[p.label], label=p.label)
                if any(math.isfinite(s) for s in std):
                    lo = [100 * (v - s) if math.isfinite(s) else 100 * v for v, s in zip(mean, std)]
                    hi = [100 * (v + s) if math.isfinite(s) else 100 * v for v, s in zip(mean, std)]
                    ax.fill_between(epochs, lo, hi, color=colors[p.label], alpha=0.18, linewidth=0)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0 and facet:
                ax.set_title(facet)
            if row == 1:
                ax.set_xlabel("epoch")
    fig.suptitle(f"Validation top-1 and ECE during training\nmean over {_seeds(items)}, band ±1 std; "
                 "cohorts: mean of their students", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for facet_axes in axes[0][1:]:
        for h, lab in zip(*facet_axes.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), frameon=False)
    return _save(fig, path)


def reliability(items: Sequence[Panel], path: Path) -> Path:
    facets = _facets(items)
    if len(facets) > 1:
        rows, cols = len(facets), max(len(m) for _, m in facets)
        cells = [(r, c, p) for r, (_, members) in enumerate(facets) for c, p in enumerate(members)]
    else:
        cols = min(len(items), 3)
        rows = math.ceil(len(items) / cols)
        cells = [(i // cols, i % cols, p) for i, p in enumerate(items)]
    fig = Figure(figsize=(3.6 * cols + 0.6, 4.4 * rows + 0.8), layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    for r, c, p in cells:
        draw_panel(fig, grid[r, c], f"{p.facet}\n{p.label}" if p.facet else p.label, p.group, ylabels=c == 0)
    fig.suptitle("Reliability on the test split at the best-on-val epoch (runs and cohort students pooled per bin)",
                 fontsize=11)
    fig.legend(handles=legend_handles(), loc="outside lower center", ncol=2, frameon=False)
    return _save(fig, path)


def _seeds(items: Sequence[Panel]) -> str:
    counts = {len(p.group.runs) for p in items}
    return f"{counts.pop()} seeds per cell" if len(counts) == 1 else f"{min(counts)}-{max(counts)} seeds per cell"


def _geometric(xs: Sequence[float]) -> bool:
    """True when values are spaced by ratios rather than steps (7/14/28 px, T = 1/4/20; not α = 0.1/0.5/0.9)."""
    v = sorted(set(xs))
    if len(v) < 3 or v[0] <= 0:
        return False
    steps = [b - a for a, b in itertools.pairwise(v)]
    ratios = [b / a for a, b in itertools.pairwise(v)]

    def spread(d: list[float]) -> float:
        mean = sum(d) / len(d)
        return math.sqrt(sum((x - mean) ** 2 for x in d) / len(d)) / mean

    return spread(ratios) < spread(steps)


def _log_axis(ax: Axes, xs: Sequence[float]) -> None:
    """A log axis for values spaced by ratios, ticks at the values themselves."""
    if _geometric(xs):
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def against_axis(groups: Sequence[Group], axis: str, teacher: dict[str, Any] | None, path: Path) -> Path:

    labels = minimal_labels(series_settings(groups, axis))
    colors, styles = _colors(labels), _styles(labels)
    fig = Figure(figsize=(11, 8.2), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    xs_all = [float(axis_value(g.settings, axis)) for g in groups]
    for ax, (metric, ylabel, scale) in zip(axes.flat, PANELS):
        for label in colors:
            members = sorted((g for g, lab in zip(groups, labels) if lab == label),
                             key=lambda g: axis_value(g.settings, axis))
            xs = [float(axis_value(g.settings, axis)) for g in members]
            stats = [_stats([_value(r, metric) for r in g.runs]) for g in members]
            errors = [scale * s if math.isfinite(s) else 0.0 for _, s in stats]
            ax.errorbar(xs, [scale * m for m, _ in stats], yerr=errors, marker="o", capsize=4, color=colors[label],
                        ls=styles[label], label=label)
        if teacher is not None and metric in teacher:
            ax.axhline(scale * teacher[metric], ls="--", color="0.3", lw=1,
                       label=f"teacher ({teacher['teacher']}, full size)")
        _log_axis(ax, xs_all)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(axis_label(axis))
    fig.suptitle(f"Test metrics against the {AXES.get(axis, (axis, ''))[0]}\nat the best-on-val epoch; mean ± 1 std "
                 f"over {_seeds([Panel('', '', g) for g in groups])}; cohorts: mean of their students", fontsize=11)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 4), frameon=False)
    return _save(fig, path)


def _value(run: Any, metric: str) -> float:
    if metric == "train_seconds":
        value = run.summary.get("train_seconds")
    else:
        value = (run.metrics(run.kinds[0], "test") or {}).get(metric)
    return float(value) if number(value) else math.nan


def draw_all(groups: Sequence[Group], teachers: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, Path]]:
    """Every figure of a report into ``out``; returns (caption, path) pairs."""
    axes = swept_axes(groups)
    items = panels(groups, axes[0] if axes else None)
    figures = [("Learning curves", learning_curves(items, out / "learning_curves.png"))]
    if any(pooled_bins(g) for g in groups):
        figures.append(("Reliability diagrams", reliability(items, out / "reliability.png")))
    teacher = teachers[0] if len(teachers) == 1 else None
    for axis in axes:
        figures.append((f"Against the {AXES.get(axis, (axis, ''))[0]}",
                        against_axis(groups, axis, teacher, out / f"vs_{axis}.png")))
    return figures
