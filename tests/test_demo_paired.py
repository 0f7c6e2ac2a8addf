"""The demo's table: every row paired by seed with the baseline (interval, Holm-corrected p, ✱), and a line saying
which rows differ beyond the seeds' noise.

Known answers, computed here without the code under test: with 3 seeds the percentile bootstrap interval runs from
the smallest to the largest paired difference (each extreme resample carries 1/27 > 2.5 % of the mass); the paired
t test with 2 degrees of freedom has the closed-form two-sided p value ``1 - |t| / sqrt(t² + 2)``; Holm's
correction of m p values multiplies the i-th smallest by m - i + 1 and keeps the sequence monotone.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillistic.experiments.demo import paired_table

pytestmark = pytest.mark.unit


def _run(folder: Path, algo: str, seed: int, top1: float, cohort: bool = False) -> Path:
    """A finished run folder as the demo leaves it (config.yaml, summary.json), without training."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"algo": algo, "seed": seed, "data_seed": 0, "model": "mlp"}))
    test = {"top1": top1, "ece": 0.02, "nll": 0.3, "entropy": 0.2}
    names = ["student0", "student1"] if cohort else ["student"]
    models: dict[str, Any] = {n: {"test": test} for n in names}
    summary: dict[str, Any] = {"status": "completed", "algo": algo, "models": models}
    if cohort:
        summary["cohort_mean"] = {"test": test}
        models["ensemble"] = {"test": {**test, "top1": top1 + 0.01}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _demo(root: Path, cells: dict[str, tuple[str, list[float], bool]]) -> list[Path]:
    folders, plan = [], []
    for label, (algo, top1s, cohort) in cells.items():
        for seed, top1 in enumerate(top1s):
            folders.append(_run(root / label / f"seed{seed}", algo, seed, top1, cohort))
            plan.append({"name": f"{label}/seed{seed}", "settings": {"variant": label, "seed": seed}})
    (root / "plan.json").write_text(json.dumps({"source": "distillistic demo", "cells": plan}))
    return folders


def _t_test_p(d: list[float]) -> float:
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_demo_table_pairs_every_row_with_the_baseline(tmp_path: Path) -> None:
    folders = _demo(tmp_path, {
        "baseline": ("baseline", [0.90, 0.91, 0.92], False),
        "kd": ("kd", [0.93, 0.93, 0.96], False),  # +3, +2, +4 pp: better on every seed
        "dml": ("dml", [0.905, 0.905, 0.925], True),  # students +0.5, -0.5, +0.5 pp; ensemble +1.5, +0.5, +1.5
    })
    text = paired_table(folders)
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| ---")}
    assert list(rows) == ["algorithm", "baseline", "kd", "dml (cohort mean)", "dml (ensemble)"]
    assert rows["baseline"][6:8] == ["ref.", "–"]
    assert rows["kd"][6] == "+3.00 [+2.00, +4.00] ✱"
    assert rows["dml (cohort mean)"][6] == "+0.17 [-0.50, +0.50]"  # one seed worse: the interval holds 0
    assert rows["dml (ensemble)"][6] == "+1.17 [+0.50, +1.50] ✱"
    assert rows["kd"][8] == "+0.00 [+0.00, +0.00]"  # ECE equal on every seed: no difference, no test
    raw = [_t_test_p([3, 2, 4]), _t_test_p([0.5, -0.5, 0.5]), _t_test_p([1.5, 0.5, 1.5])]
    order = sorted(range(3), key=lambda i: raw[i])
    holm, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        holm[i] = running
    for row, p in zip(("kd", "dml (cohort mean)", "dml (ensemble)"), holm):
        assert rows[row][7] == f"{p:.3f}", row
    # Holm's p of kd (0.105) and of the ensemble (0.146) are above 0.05: of one sign on every seed, not beyond noise.
    assert "beyond the seeds' noise: none; of one sign on every seed, not confirmed by the corrected test: kd " \
           "(+3.00 pp), dml (ensemble) (+1.17 pp); within the noise: dml (cohort mean) (+0.17 pp)." in text
    assert holm[0] == pytest.approx(0.105, abs=1e-3)  # 3 x (1 - t / sqrt(t² + 2)), t = 3 / (1 / sqrt(3))


def test_demo_table_without_a_baseline_says_so(tmp_path: Path) -> None:
    folders = _demo(tmp_path, {"kd": ("kd", [0.93], False), "dml": ("dml", [0.92], True)})
    text = paired_table(folders)
    assert "| kd | 1 | 93.00 | 2.00 | 0.300 | 0.200 | – | – | – | – |" in text
    assert "No paired differences: no `baseline` cell shares seeds with the others." in text
