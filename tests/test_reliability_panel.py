"""Reliability diagrams weigh bins by their samples and tell over- from under-confidence (known answers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from distillistic.experiments import reliability_panel as rp
from distillistic.experiments.plots import panels
from distillistic.experiments.report import find_runs, group_runs
from test_report import make_run


def test_opacity_is_the_log_share_of_the_fullest_bin() -> None:
    counts = [0, 1, 3, 90, 6]
    alpha = rp.bin_opacity(counts)
    assert alpha[0] == 0.0  # empty: not drawn
    assert alpha[3] == 1.0  # the fullest bin is solid
    assert alpha[2] == pytest.approx(math.log(4) / math.log(91))  # 0.307
    assert alpha[4] == pytest.approx(math.log(7) / math.log(91))  # 0.431
    assert alpha[1] == pytest.approx(max(rp.LEAST_OPACITY, math.log(2) / math.log(91)))  # 0.154: just above the floor
    assert rp.bin_opacity([0, 0]) == [0.0, 0.0]
    assert rp.bin_opacity([5, 5]) == [1.0, 1.0]


def test_confidence_gap_is_weighted_by_counts() -> None:
    # 90 samples 2 pp over-confident, 10 samples 40 pp under-confident: (90*0.02 - 10*0.4) / 100 = -0.022
    assert rp.confidence_gap([90, 10, 0], [0.95, 0.9, 0.0], [0.97, 0.5, 0.7]) == pytest.approx(-0.022)
    assert math.isnan(rp.confidence_gap([0, 0], [0.0, 0.0], [0.0, 0.0]))


def _drawn(counts: list[int], acc: list[float], conf: list[float]) -> tuple[list[tuple[float, ...]], object]:
    fig = Figure()
    top, bottom = fig.subplots(2, 1)
    rp._draw_bins(top, bottom, counts, acc, conf)
    return [tuple(p.get_edgecolor()) for p in top.patches], (top, bottom)


def test_gaps_are_coloured_by_direction_and_bars_shaded_by_count() -> None:
    counts, acc, conf = [0, 2, 98], [0.0, 0.9, 0.5], [0.1, 0.4, 0.7]  # bin 1 under-confident, bin 2 over
    edges, (top, bottom) = _drawn(counts, acc, conf)
    assert len(top.patches) == 4  # the empty bin draws nothing; two bars (accuracy, gap) per bin
    alpha = rp.bin_opacity(counts)
    acc_small, gap_small, acc_full, gap_full = top.patches
    assert acc_small.get_facecolor() == pytest.approx(to_rgba(rp.ACCURACY, alpha[1]))
    assert acc_full.get_facecolor() == pytest.approx(to_rgba(rp.ACCURACY, 1.0))
    assert edges[1][:3] == pytest.approx(to_rgba(rp.UNDER)[:3])
    assert edges[3][:3] == pytest.approx(to_rgba(rp.OVER)[:3])
    assert gap_small.get_hatch() != gap_full.get_hatch()
    # each gap runs from the bin's accuracy to its mean confidence
    assert (gap_small.get_y(), gap_small.get_y() + gap_small.get_height()) == pytest.approx((0.9, 0.4))
    assert (gap_full.get_y(), gap_full.get_y() + gap_full.get_height()) == pytest.approx((0.5, 0.7))
    assert bottom.get_yscale() == "log"
    assert [p.get_height() for p in bottom.patches] == [2, 98]


def test_a_panel_titles_the_count_weighted_gap(tmp_path: Path) -> None:
    make_run(tmp_path / "a", 0, 0.80, algo="baseline")  # every sample at confidence 0.83, accuracy 0.80
    make_run(tmp_path / "b", 1, 0.90, algo="baseline")  # confidence 0.83, accuracy 0.90
    (panel,) = panels(group_runs(find_runs([tmp_path])[0]), None)
    fig = Figure()
    rp.draw_panel(fig, fig.add_gridspec(1, 1)[0, 0], panel.label, panel.group, ylabels=True)
    title = fig.axes[0].get_title()
    assert "conf − acc -2.00 pp" in title  # pooled: 200 samples at 0.83 with accuracy 0.85
    labels = [h.get_label() for h in rp.legend_handles()]
    assert any(label.startswith("over-confident") for label in labels)
    assert any(label.startswith("under-confident") for label in labels)
