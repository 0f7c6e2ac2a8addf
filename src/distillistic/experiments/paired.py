"""Paired statistics of a comparison: each method against a reference cell, over the seeds they share.

Two cells are paired run by run on their seeds (``seed`` and ``data_seed``): the same seed gives both the
same data split and initial draw, so the per-seed difference removes the seed's own luck. For every
compared cell this module gives

* the mean of the paired differences (the cell minus the reference),
* a 95 % bootstrap interval of that mean (:func:`scipy.stats.bootstrap`, percentile method, 9,999
  resamples, seeded: the same runs always give the same interval),
* the p value of the paired t test (:func:`scipy.stats.ttest_rel`, two-sided), corrected for the number
  of compared cells by Holm's step-down method (:func:`holm`),

and marks a row whose interval excludes 0. With 3 seeds a bootstrap has only 10 distinct resamples: the
interval is coarse, which is why the t test's corrected p value stands beside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distillistic.experiments.results import Group, Run, number

CONFIDENCE = 0.95
RESAMPLES = 9999
BOOTSTRAP_SEED = 0
ALPHA = 0.05  # the corrected p value below which a difference whose interval excludes 0 is called beyond noise
TEST_NAME = "paired t test (scipy.stats.ttest_rel, two-sided), Holm-corrected over the compared cells"


@dataclass
class Paired:
    """One cell against the reference: differences per shared seed and what they say."""

    label: str
    n: int  # paired seeds
    mean: float  # mean difference (cell - reference)
    low: float  # bootstrap interval
    high: float
    p: float  # the paired t test's raw p value (NaN: no test, e.g. fewer than 2 pairs)
    p_holm: float = math.nan

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high) and (self.low > 0 or self.high < 0)

    @property
    def settled(self) -> bool:
        """Beyond the seeds' noise: the interval excludes 0 *and* the Holm-corrected p value is below
        :data:`ALPHA` (with 3 seeds the interval alone excludes 0 whenever the 3 differences share a sign,
        which a null effect does 1 time in 4)."""
        return self.excludes_zero and math.isfinite(self.p_holm) and self.p_holm < ALPHA


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the order given; NaN entries stay NaN and do not count in m.

    Sorted ascending, the i-th of m p values (from 1) becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
    """
    order = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def differences(cell: Sequence[float], reference: Sequence[float]) -> Paired:
    """Mean, bootstrap interval and paired t test of ``cell[i] - reference[i]`` (equal lengths, paired)."""
    import numpy as np
    from scipy import stats

    if len(cell) != len(reference):
        raise ValueError(f"paired samples must have one length, not {len(cell)} and {len(reference)}")
    d = np.asarray(cell, dtype=float) - np.asarray(reference, dtype=float)
    n = len(d)
    if n == 0:
        return Paired("", 0, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired("", 1, mean, math.nan, math.nan, math.nan)
    if float(d.max() - d.min()) == 0.0:  # every pair differs by the same amount: no spread to resample
        p = 0.0 if mean != 0 else math.nan  # t is ±inf, or 0/0 when nothing differs
        return Paired("", n, mean, mean, mean, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's "nearly identical" notes on tiny samples
        interval = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, method="percentile",
                                   n_resamples=RESAMPLES, random_state=np.random.default_rng(BOOTSTRAP_SEED))
        p = float(stats.ttest_rel(np.asarray(cell, dtype=float), np.asarray(reference, dtype=float)).pvalue)
    ci = interval.confidence_interval
    return Paired("", n, mean, float(ci.low), float(ci.high), p)


def _seed_of(run: Run) -> tuple[str, str]:
    return (repr(run.config.get("seed")), repr(run.config.get("data_seed")))


def pairs(cell: Group, reference: Group, value: Callable[[Run], float | None],
          reference_value: Callable[[Run], float | None] | None = None) -> tuple[list[float], list[float]]:
    """The two cells' values on the seeds both have (``value`` of each run, ``reference_value`` of the
    reference's, the same by default); a missing value drops the pair."""
    read = reference_value or value
    ref = {_seed_of(r): read(r) for r in reference.runs}
    a, b = [], []
    for run in cell.runs:
        mine, theirs = value(run), ref.get(_seed_of(run))
        if number(mine) and number(theirs) and math.isfinite(mine) and math.isfinite(theirs):
            a.append(float(mine))
            b.append(float(theirs))
    return a, b


def named(groups: Sequence[Group], name: str) -> list[Group]:
    """The cells called ``name``: those whose variant or label is ``name``, else those of algorithm ``name``
    (so that ``kd`` names the cell ``kd`` and not ``kd_calibrated``, which is KD too)."""
    exact = [g for g in groups if name in (g.settings.get("variant"), g.label)]
    return exact or [g for g in groups if g.settings.get("algo") == name]


def choose_reference(groups: Sequence[Group], name: str) -> dict[int, Group]:
    """For each cell (by index), the reference cell it is compared with: a cell called ``name`` (:func:`named`)
    that shares the most settings with it; none where two candidates tie."""
    candidates = named(groups, name)
    chosen: dict[int, Group] = {}
    if not candidates:  # no cell of that name (e.g. a tune or sweep without the baseline): nothing to pair with
        return chosen
    for i, g in enumerate(groups):
        if any(g is c for c in candidates):
            continue
        scores = [_shared(g.settings, c.settings) for c in candidates]
        best = max(scores)
        if scores.count(best) == 1:
            chosen[i] = candidates[scores.index(best)]
    return chosen


def _shared(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    return sum(1 for k in a.keys() & b.keys() if repr(a[k]) == repr(b[k]))


def interval_text(p: Paired, scale: float = 100.0, digits: int = 2) -> str:
    """``+0.52 [+0.10, +0.90]`` (scaled), ``–`` without a difference."""
    if not math.isfinite(p.mean):
        return "–"
    mean = f"{scale * p.mean:+.{digits}f}"
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        return mean
    return f"{mean} [{scale * p.low:+.{digits}f}, {scale * p.high:+.{digits}f}]"


def p_text(p: float) -> str:
    return "–" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def holm_fill(results: Iterable[Paired]) -> None:
    """Set every result's ``p_holm``: Holm's correction over ``results`` (one family)."""
    kept = list(results)
    for result, adjusted in zip(kept, holm([r.p for r in kept])):
        result.p_holm = adjusted


def compare(groups: Sequence[Group], reference: str, value: Callable[[Run], float | None]) -> dict[int, Paired]:
    """Each cell's (by index) paired difference in ``value`` to its reference cell (:func:`choose_reference`),
    Holm-corrected over the compared cells; the reference cells themselves are not compared."""
    out: dict[int, Paired] = {}
    for i, ref in choose_reference(groups, reference).items():
        out[i] = differences(*pairs(groups[i], ref, value))
        out[i].label = ref.label
    holm_fill(out.values())
    return out


def columns(result: Paired | None, is_reference: bool, scale: float = 100.0, digits: int = 2) -> list[str]:
    """A table row's two cells: ``Δ [95 % CI]`` (✱ when the interval excludes 0) and the Holm p value;
    ``ref.`` for the reference cell, ``–`` for a cell with nothing to pair with."""
    if result is None:
        return ["ref." if is_reference else "–", "–"]
    return [interval_text(result, scale, digits) + (" ✱" if result.excludes_zero else ""), p_text(result.p_holm)]


def noise(result: Paired | None, unit: str = "pp", scale: float = 100.0, digits: int = 2) -> str:
    """How a difference stands against the seeds' noise, in words a verdict can quote: ``beyond the seeds'
    noise (Δ +0.86 [+0.70, +1.00] pp, p 0.041 Holm)`` (:attr:`Paired.settled`), ``of one sign on every seed
    but not confirmed by the corrected test (…)`` (the interval excludes 0, p does not), or ``within the
    seeds' noise (…)``."""
    if result is None or not math.isfinite(result.mean):
        return "not measured (no seeds shared with the reference)"
    if result.n < 2:
        return f"not judged against noise (one seed: Δ {interval_text(result, scale, digits)} {unit})"
    where = ("beyond the seeds' noise" if result.settled else "of one sign on every seed but not confirmed by "
             "the corrected test" if result.excludes_zero else "within the seeds' noise")
    return f"{where} (Δ {interval_text(result, scale, digits)} {unit}, p {p_text(result.p_holm)} Holm)"


def legend(reference: str) -> str:
    """The sentence under a table with paired columns: what Δ, the interval, p and ✱ are."""
    return (f"Δ: the cell minus `{reference}` on the same seeds (paired run by run); 95 % interval: "
            f"scipy.stats.bootstrap (percentile, {RESAMPLES:,d} resamples) of the mean paired difference; p: "
            f"{TEST_NAME}, one family per column. ✱: the interval excludes 0. With 3 seeds the interval runs from "
            "the smallest to the largest paired difference, so it excludes 0 exactly when every seed's difference "
            "has the same sign (a null effect does so 1 time in 4): the verdicts call a difference beyond the "
            f"seeds' noise only when the interval excludes 0 and the corrected p is below {ALPHA}.")
