"""One reliability diagram of a report: a cell's test bins pooled over runs and students, weighed by their counts.

A bin of 2 samples and the bin that holds 90 % of them must not weigh alike on the page, and an over-confident
bin must read differently from an under-confident one at a glance:

* each bin's bars are shaded by its share of the samples on a log scale (:func:`bin_opacity`): the fullest bin
  solid, a bin of a few samples pale;
* the gap between the bin's accuracy and its mean confidence is red and hatched ``///`` where the model is
  over-confident (confidence above accuracy), amber and hatched ``\\\\`` where it is under-confident;
* the panel beneath gives each bin's number of samples on a log axis (so that bins of 1–3 samples show at all),
  and the title gives the count-weighted mean of confidence − accuracy (:func:`confidence_gap`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from distillistic.experiments.results import Group, mapping, mean_std, number, pm

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

ACCURACY, OVER, UNDER = "#4c72b0", "#c0392b", "#e69f00"
LEAST_OPACITY = 0.15  # a non-empty bin's bars never vanish


def _bins(rel: Any) -> dict[str, list[float]] | None:
    """A summary's reliability bins (count, accuracy, confidence: lists of numbers of one length), else None."""
    rel = mapping(rel)
    lists = [rel.get(k) for k in ("count", "accuracy", "confidence")]
    if not all(isinstance(v, list) and all(number(x) for x in v) for v in lists) or len({len(v) for v in lists}) != 1:
        return None
    return {k: [float(x) for x in v] for k, v in zip(("count", "accuracy", "confidence"), lists)}


def pooled_bins(group: Group) -> tuple[list[int], list[float], list[float]] | None:
    """Reliability bins of the test split pooled over runs and students: counts, accuracy, confidence."""
    counts: list[float] = []
    hits: list[float] = []
    conf: list[float] = []
    for run in group.runs:
        for name in run.students:
            rel = _bins(mapping(mapping(mapping(run.summary.get("models")).get(name)).get("test")).get("reliability"))
            if rel is None or (counts and len(rel["count"]) != len(counts)):
                continue  # none, or malformed: left out of the pooled diagram
            if not counts:
                counts, hits, conf = ([0.0] * len(rel["count"]) for _ in range(3))
            for i, (c, a, p) in enumerate(zip(rel["count"], rel["accuracy"], rel["confidence"])):
                counts[i] += c
                hits[i] += c * a
                conf[i] += c * p
    if not counts:
        return None
    return ([int(c) for c in counts], [h / c if c else 0.0 for h, c in zip(hits, counts)],
            [p / c if c else 0.0 for p, c in zip(conf, counts)])


def bin_opacity(counts: Sequence[int]) -> list[float]:
    """Opacity of each bin's bars: ``log(1 + n) / log(1 + n_max)``, at least :data:`LEAST_OPACITY` for a bin with
    samples, 0 for an empty one."""
    top = max(counts, default=0)
    if top <= 0:
        return [0.0 for _ in counts]
    return [max(LEAST_OPACITY, math.log1p(n) / math.log1p(top)) if n > 0 else 0.0 for n in counts]


def confidence_gap(counts: Sequence[int], acc: Sequence[float], conf: Sequence[float]) -> float:
    """Mean confidence minus accuracy, each bin weighted by its samples (> 0: over-confident); NaN if empty."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    return sum(n * (p - a) for n, a, p in zip(counts, acc, conf)) / total


def legend_handles() -> list[Artist]:
    """The legend of every panel (both kinds of gap, whether or not the first panel shows both)."""
    return [Line2D([], [], ls="--", color="0.4", lw=1, label="perfect calibration"),
            Patch(facecolor=ACCURACY, label="accuracy in bin (shade: share of samples, log)"),
            Patch(facecolor="none", edgecolor=OVER, hatch="///", label="over-confident: confidence > accuracy"),
            Patch(facecolor="none", edgecolor=UNDER, hatch="\\\\\\", label="under-confident: confidence < accuracy")]


def _draw_bins(top: Any, bottom: Any, counts: list[int], acc: list[float], conf: list[float]) -> None:
    k = len(counts)
    for i, alpha in enumerate(bin_opacity(counts)):
        if not counts[i]:
            continue
        x = (i + 0.5) / k
        top.bar(x, acc[i], width=1 / k, color=to_rgba(ACCURACY, alpha), edgecolor=to_rgba(ACCURACY, 1.0), lw=0.4)
        # The gap's far edge is the bin's mean confidence: above the accuracy bar or inside it.
        gap = OVER if conf[i] >= acc[i] else UNDER
        top.bar(x, conf[i] - acc[i], bottom=acc[i], width=1 / k, facecolor="none", lw=0.8,
                hatch="///" if gap == OVER else "\\\\\\", edgecolor=to_rgba(gap, max(alpha, 0.5)))
        bottom.bar(x, counts[i], width=1 / k, color=to_rgba("0.35", alpha))
    bottom.set_yscale("log")
    bottom.set_ylim(bottom=0.5)  # a bin of one sample shows as a bar


def draw_panel(fig: Figure, spec: Any, title: str, group: Group, ylabels: bool) -> None:
    """Cell ``group``'s reliability diagram (above) and its samples per bin (beneath) in ``spec`` of ``fig``."""
    top, bottom = spec.subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05).subplots(sharex=True)
    bins = pooled_bins(group)
    kinds = group.runs[0].kinds
    ece = mean_std([(r.metrics(kinds[0], "test") or {}).get("ece", math.nan) for r in group.runs])
    gap = confidence_gap(*bins) if bins is not None else math.nan
    gap_text = f"{100 * gap:+.2f} pp" if math.isfinite(gap) else "–"
    top.set_title(f"{title}\nECE {pm(ece[0], ece[1], scale=100)} % (n = {len(group.runs)}), "
                  f"conf − acc {gap_text}", fontsize=9)
    top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1)
    if bins is not None:
        _draw_bins(top, bottom, *bins)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    bottom.set_xlabel("confidence (max softmax)")
    if ylabels:
        top.set_ylabel("accuracy in bin")
        bottom.set_ylabel("samples (log)")
