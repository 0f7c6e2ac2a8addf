"""The thesis's question as a claim: is an online-distillation cohort greater than the sum of its parts, at its cost?

Every cell gets about the same training compute, B = 3 ``mlp`` students x ``E`` epochs (FLOPs counted per
run, the teacher's own training included, and shown in the table):

* ``alone``: one student, 3E epochs (all of B on one model);
* DML, DML_e, KDCL and PCL cohorts of 3 students for E epochs and of 2 for 1.5E, each seen as one of its
  students (*cohort mean*: what one deploys) and as the cohort's ensemble;
* ``indep2`` / ``indep3``: 2 or 3 students trained independently (the baseline's cohort: no peer term, the
  same batches, their own initialisations) for 1.5E / E epochs, and their ensemble;
* ``wide2`` / ``wide3``: one wider MLP with the parameters of the cohort of 2 / 3 (``mlp_x2``, ``mlp_x3``),
  alone for 1.5E / E epochs;
* ``kd``: KD into one student for E epochs from an ``mlp_x2`` teacher trained first for E epochs, whose
  training FLOPs are added to the student's.

Each row is compared with ``alone`` on the same seeds (paired; 95 % bootstrap interval, paired t test,
Holm over the rows: :mod:`distillistic.experiments.paired`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from distillistic.experiments.comparison import Entry, entries, paired_rows
from distillistic.experiments.cost_view import si
from distillistic.experiments.paired import (
    Paired,
    differences,
    holm_fill,
    interval_text,
    legend,
    noise,
    p_text,
    pairs,
)
from distillistic.experiments.results import Group, pm

EPOCHS = 2  # E: the cohort of 3's epochs
COHORTS = ("dml", "dml_e", "kdcl", "pcl")
BASE: dict[str, Any] = {"model": "mlp", "max_train_samples": 1000}  # sized for 2 shared CPU cores


def variants() -> dict[str, dict[str, Any]]:
    """The claim's cells: name -> settings (epochs chosen so that every cell trains about 3E student-epochs)."""
    e = EPOCHS
    cells: dict[str, dict[str, Any]] = {"alone": {"algo": "baseline", "epochs": 3 * e}}
    for algo in COHORTS:
        cells[f"{algo}2"] = {"algo": algo, "students": 2, "epochs": 3 * e // 2}
        cells[f"{algo}3"] = {"algo": algo, "students": 3, "epochs": e}
    cells |= {"indep2": {"algo": "baseline", "students": 2, "epochs": 3 * e // 2},
              "indep3": {"algo": "baseline", "students": 3, "epochs": e},
              "wide2": {"algo": "baseline", "model": "mlp_x2", "epochs": 3 * e // 2},
              "wide3": {"algo": "baseline", "model": "mlp_x3", "epochs": e},
              "kd": {"algo": "kd", "epochs": e, "teacher": "mlp_x2", "teacher_weights": "train",
                     "teacher_epochs": e, "temperature": 4.0, "alpha": 0.5}}
    return cells


def _row(e: Entry, diff: Paired | None) -> str:
    lat = e.cost("latency")[0]
    delta = "ref." if diff is None else interval_text(diff) + (" ✱" if diff.excludes_zero else "")
    cells = [e.label, e.kind, pm(*e.stat(e.metric("top1")), 100.0), pm(*e.stat(e.metric("ece")), 100.0),
             si(e.cost("train_flops")[0]), si(e.cost("flops")[0]), si(e.cost("params")[0]),
             f"{lat:.3f}" if math.isfinite(lat) else "–", delta, p_text(diff.p_holm) if diff else "–",
             str(len(e.runs))]
    return "| " + " | ".join(cells) + " |"


def table(groups: list[Group], reference: str = "alone") -> tuple[list[str], str]:
    """The claim's table (every row against ``reference``, ``alone``) and its verdict."""
    items = [e for e in entries(groups) if not (e.kind == "cohort mean" and str(e.label).startswith("indep"))]
    diffs = paired_rows(items, groups, reference, "top1")
    lines = ["| cell | model | test top-1 (%) | test ECE (%) | training FLOPs (teacher's included) | "
             "inference FLOPs/img | params | latency ms (batch 1, median) | Δ top-1 vs alone (pp) [95 % CI] | "
             "p (Holm) | seeds |", "|" + "---|" * 11]
    lines += [_row(e, diffs.get(i)) for i, e in enumerate(items)]
    lines += ["", legend(reference) + f" `{reference}`: one student given the whole budget. A cohort's *cohort "
              "mean* row is one of its students (what one deploys); its *ensemble* row runs all of them."]
    return lines, verdict(items, diffs)


def _best(items: Sequence[Entry], diffs: dict[int, Paired], names: Sequence[str], kind: str) -> tuple[str, float, int]:
    """The best (mean test top-1) row among cells ``names`` seen as ``kind``: label, top-1, index."""
    found = [(e.stat(e.metric("top1"))[0], i) for i, e in enumerate(items) if e.label in names and e.kind == kind]
    found = [f for f in found if math.isfinite(f[0])]
    if not found:
        return "", math.nan, -1
    top1, i = max(found)
    return items[i].label, top1, i


def _against(items: Sequence[Entry], i: int, others: Sequence[int]) -> list[Paired]:
    """Row ``i`` minus each of rows ``others`` in test top-1, paired by seed, Holm-corrected over them."""
    found = [differences(*pairs(items[i].group, items[j].group, items[i].metric("top1"), items[j].metric("top1")))
             for j in others]
    holm_fill(found)
    return found


def verdict(items: Sequence[Entry], diffs: dict[int, Paired]) -> str:
    """Plain words: does a cohort's student (or ensemble) beat what the same compute buys otherwise, beyond the
    seeds' noise (paired by seed: the interval of the difference excludes 0)?"""
    cohorts = [f"{a}{k}" for a in COHORTS for k in (2, 3)]
    alone = next((e.stat(e.metric("top1"))[0] for e in items if e.label == "alone"), math.nan)
    name, student, i = _best(items, diffs, cohorts, "cohort mean")
    ens_name, ens, e = _best(items, diffs, cohorts, "ensemble")
    ind_name, ind, k = _best(items, diffs, ["indep2", "indep3"], "ensemble")
    found = [_best(items, diffs, [n], "student") for n in ("wide2", "wide3", "kd")]
    others = [(lab, top, j) for lab, top, j in found if lab]
    d = diffs.get(i)
    held = d is not None and d.settled and d.mean > 0
    against = _against(items, i, [j for _, _, j in others]) if i >= 0 else []
    beats = [lab for (lab, _, _), r in zip(others, against) if r.settled and r.mean > 0]
    ens_d = _against(items, e, [k])[0] if e >= 0 and k >= 0 else None
    greater = ens_d is not None and ens_d.settled and ens_d.mean > 0
    versus = "; ".join(f"{lab} {100 * top:.2f} %, Δ {interval_text(r)} pp" for (lab, top, _), r in zip(others, against))
    return (f"At about equal training compute, the best cohort's student ({name}: {100 * student:.2f} %) "
            f"{'beats' if held else 'is worse than' if d and d.settled else 'does not clearly beat'} one "
            "student given the whole budget "
            f"({100 * alone:.2f} %; {noise(d)}); of the other uses of that compute (a wider student alone, KD with "
            f"its teacher's training) it beats {', '.join(beats) or 'none'} beyond the seeds' noise ({versus}). "
            f"The best cohort ensemble ({ens_name}: {100 * ens:.2f} %) against the best ensemble of independent "
            f"students ({ind_name}: {100 * ind:.2f} %): {'greater' if greater else 'not greater'}, {noise(ens_d)}. "
            f"Verdict: the cohort is {'greater' if held and greater else 'not greater'} than the sum of its parts "
            "here, at its cost.")
