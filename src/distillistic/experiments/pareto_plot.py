"""The report's Pareto figure: test top-1 and ECE against one cost, each row a point with ±1 std error bars.

The Pareto-optimal rows (:func:`distillistic.experiments.comparison.pareto_marks`) are drawn as filled
diamonds joined by the front's staircase; the others as open circles. The x axis is logarithmic when the
costs span more than a factor of 10 (a cohort of 3 against one student with a teacher's training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distillistic.experiments.comparison import Entry, pareto_marks
from distillistic.experiments.cost_view import AXES


def _front(ax: Axes, points: Sequence[tuple[float, float]]) -> None:
    """The staircase through the optimal points, sorted by cost."""
    pts = sorted(points)
    xs: list[float] = []
    ys: list[float] = []
    for x, y in pts:
        if xs:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    ax.plot(xs, ys, color="0.3", lw=1, ls="--", zorder=1, label="Pareto front")


def _panel(ax: Axes, items: Sequence[Entry], axis: str, metric: str, colors: dict[str, object]) -> None:
    marks = pareto_marks(items, axis, metric)
    front = []
    for e, optimal in zip(items, marks):
        x, xerr = e.cost(axis)
        y, yerr = e.stat(e.metric(metric))
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        name = f"{e.label} ({e.kind})" if e.kind != "student" else e.label
        ax.errorbar(x, 100 * y, xerr=xerr if math.isfinite(xerr) else None,
                    yerr=100 * yerr if math.isfinite(yerr) else None, marker="D" if optimal else "o",
                    ms=7, capsize=3, color=colors[name], mfc=colors[name] if optimal else "white", ls="none",
                    label=name, zorder=2)
        if optimal:
            front.append((x, 100 * y))
    if front:
        _front(ax, front)
    xs = [e.cost(axis)[0] for e in items if math.isfinite(e.cost(axis)[0]) and e.cost(axis)[0] > 0]
    if xs and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(AXES[axis])
    ax.set_ylabel("test top-1 accuracy (%)" if metric == "top1" else "test ECE (%, 15 bins; lower is better)")
    ax.grid(alpha=0.3)


def pareto_figure(items: Sequence[Entry], axis: str, path: Path) -> Path | None:
    """Draw ``pareto-<axis>.png``: top-1 (left) and ECE (right) against ``axis``; return its path (None, and
    nothing drawn, when no row has that cost: summaries written before costs were recorded)."""
    from matplotlib import colormaps

    if not any(math.isfinite(e.cost(axis)[0]) for e in items):
        return None
    names = [f"{e.label} ({e.kind})" if e.kind != "student" else e.label for e in items]
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    colors: dict[str, object] = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _panel(left, items, axis, "top1", colors)
    _panel(right, items, axis, "ece", colors)
    seeds = sorted({len(e.runs) for e in items})
    fig.suptitle(f"Test top-1 and ECE against {AXES[axis]}\nmean ± 1 std over {'-'.join(map(str, seeds))} seeds; "
                 "filled diamonds: Pareto-optimal (no other row is as cheap and as good, and better in one)",
                 fontsize=11)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path
