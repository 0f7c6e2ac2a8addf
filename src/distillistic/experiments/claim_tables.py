"""The tables and verdicts of ``distillistic reproduce``'s swept claims, each cell paired with the claim's reference.

Every table gives, beside each cell's mean ± std over its seeds, its paired difference to the claim's reference
cell (the same seeds, run by run; 95 % bootstrap interval and Holm-corrected paired t test, from
:mod:`distillistic.experiments.paired`), and every verdict says whether the difference it rests on lies beyond
the seeds' noise (the interval excludes 0) or within it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from distillistic.experiments import paired
from distillistic.experiments.paired import Paired, noise
from distillistic.experiments.results import Group, Run, mean_std, pm

Value = Callable[[Run], float | None]


# --- what the tables read ------------------------------------------------------------------------------------


def test_metrics(run: Run) -> dict[str, Any]:
    """The run's student test metrics (a cohort: the mean of its students)."""
    if run.cohort:
        return dict((run.summary.get("cohort_mean") or {}).get("test") or {})
    return dict((run.summary["models"].get("student") or {}).get("test") or {})


def confidence_gap(run: Run) -> float | None:
    """Mean confidence minus accuracy on test (> 0 over-confident, < 0 under-confident), students pooled."""
    gaps = []
    for name in run.students:
        test = run.summary["models"][name].get("test") or {}
        rel = test.get("reliability")
        if not rel:
            continue
        n = sum(rel["count"])
        conf = sum(c * f for c, f in zip(rel["count"], rel["confidence"]) if c) / max(n, 1)
        gaps.append(conf - test["top1"])
    return statistics.fmean(gaps) if gaps else None


def metric(key: str) -> Value:
    return lambda run: test_metrics(run).get(key)


def last_train(run: Run, key: str, model: str = "student") -> float | None:
    rows = [r for r in run.history if r.get("split") == "train" and r.get("model", "").startswith(model)
            and r.get(key) is not None]
    return rows[-1][key] if rows else None


def oscillation(run: Run) -> float | None:
    """Mean |change| of the students' val top-1 from one epoch to the next (the thesis's instability); the
    students themselves, not their EMA copies (which are smooth by construction)."""
    series: dict[str, list[float]] = {}
    for r in run.history:
        model = r.get("model", "")
        if r.get("split") == "val" and model.startswith("student") and not model.endswith("_ema") \
                and r.get("top1") is not None:
            series.setdefault(r["model"], []).append(r["top1"])
    steps = [abs(b - a) for s in series.values() for a, b in itertools.pairwise(s)]
    return statistics.fmean(steps) if steps else None


def disagreement(run: Run) -> float | None:
    rows = [r["pairwise_kl"] for r in run.history if r.get("model") == "cohort" and r.get("split") == "train"]
    return statistics.fmean(rows) if rows else None


def teacher_test(run: Run, key: str) -> float | None:
    return ((run.summary["models"].get("teacher") or {}).get("test") or {}).get(key)


# --- table pieces ----------------------------------------------------------------------------------------------


def stat(group: Group, fn: Value, scale: float = 100.0) -> tuple[str, float]:
    mean, std, _ = mean_std(fn(r) for r in group.runs)
    return pm(mean, std, scale), mean


def teacher_top1(groups: Sequence[Group]) -> str:
    mean, std, n = mean_std(teacher_test(r, "top1") for g in groups for r in g.runs)
    return pm(mean, std, 100.0) if n else "–"


def header(cols: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def delta_head(reference: str, names: Sequence[str]) -> list[str]:
    """The paired columns' titles: ``Δ top-1 vs baseline (pp) [95 % CI]``, ``p (Holm)`` for each name."""
    return [c for name in names for c in (f"Δ {name} vs {reference} (pp) [95 % CI]", "p (Holm)")]


def delta_cells(diffs: Sequence[dict[int, Paired]], i: int, is_reference: bool) -> list[str]:
    return [c for d in diffs for c in paired.columns(d.get(i), is_reference)]


def paired_table(groups: Sequence[Group], reference: str, columns: Sequence[tuple[str, Callable[[Group], str]]],
                 compared: Sequence[tuple[str, Value]], versus: str | None = None,
                 ) -> tuple[list[str], list[dict[int, Paired]]]:
    """A claim's table: each cell's own ``columns`` (title, text of a group), then for each ``compared`` metric
    (name, value of a run) its paired difference to ``reference`` (Δ [95 % CI], Holm p), then the seeds; and the
    differences, by metric and cell index. ``versus``: the reference as the titles name it."""
    refs = paired.named(groups, reference)
    diffs = [paired.compare(groups, reference, fn) for _, fn in compared]
    names = [name for name, _ in compared]
    lines = header(["cell", *(title for title, _ in columns), *delta_head(versus or reference, names), "seeds"])
    for i, g in enumerate(groups):
        cells = [g.label, *(text(g) for _, text in columns), *delta_cells(diffs, i, any(g is r for r in refs)), g.seeds]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines, diffs


def one_pair(cell: Group, reference: Group, fn: Value) -> Paired:
    """``cell`` minus ``reference`` in ``fn``, paired by seed: one comparison (its Holm p is its own)."""
    result = paired.differences(*paired.pairs(cell, reference, fn))
    result.label = reference.label
    paired.holm_fill([result])
    return result


def index_of(groups: Sequence[Group], test: Callable[[Group], bool]) -> int:
    """The first cell that passes ``test`` (-1: none)."""
    return next((i for i, g in enumerate(groups) if test(g)), -1)


def _named(text: str, *words: str) -> Callable[[Group], bool]:
    return lambda g: any(w in str(g.label) for w in words) or g.settings.get("algo") == text


# --- the claims' tables ------------------------------------------------------------------------------------------


def hinton(groups: list[Group], reference: str = "baseline") -> tuple[list[str], str]:
    """KD against the student trained alone: top-1, ECE, NLL, paired top-1 and ECE differences."""
    lines, diffs = paired_table(
        groups, reference,
        [("test top-1 %", lambda g: stat(g, metric("top1"))[0]), ("test ECE %", lambda g: stat(g, metric("ece"))[0]),
         ("test NLL", lambda g: stat(g, metric("nll"), 1.0)[0])],
        [("top-1", metric("top1")), ("ECE", metric("ece"))])
    lines += [f"\nTeacher test top-1: {teacher_top1(groups)} %.", "", paired.legend(reference)]
    k = index_of(groups, lambda g: g.settings.get("algo") == "kd")
    if k < 0 or k not in diffs[0]:
        return lines, f"No KD cell paired with `{reference}`: the claim cannot be judged."
    d, e = diffs[0][k], diffs[1][k]
    held = d.settled and d.mean > 0
    base = stat(diffs_reference(groups, reference, k), metric("top1"))[1]
    verdict = (f"KD {'beats' if held else 'does not beat'} the student trained alone here "
               f"({100 * stat(groups[k], metric('top1'))[1]:.2f} vs {100 * base:.2f} % mean test top-1; "
               f"the paired difference is {noise(d)}); the difference in ECE is {noise(e)}.")
    return lines, verdict


def diffs_reference(groups: Sequence[Group], reference: str, i: int) -> Group:
    """The reference cell that cell ``i`` was paired with."""
    return paired.choose_reference(groups, reference)[i]


def smoothing(groups: list[Group], reference: str = "baseline") -> tuple[list[str], str]:
    """Tf-KD's two virtual teachers: the students' confidence gap, and whether the smoothed one's is negative
    (under-confident) beyond noise and the calibrated one's smaller in size beyond noise (paired by seed)."""
    lines, _ = paired_table(
        groups, reference,
        [("test top-1 %", lambda g: stat(g, metric("top1"))[0]), ("test ECE %", lambda g: stat(g, metric("ece"))[0]),
         ("entropy", lambda g: stat(g, metric("entropy"), 1.0)[0]),
         ("confidence − accuracy (pp)", lambda g: stat(g, confidence_gap)[0]),
         ("signal entropy", lambda g: stat(g, lambda r: last_train(r, "tfkd_target_entropy"), 1.0)[0])],
        [("top-1", metric("top1")), ("confidence − accuracy", confidence_gap)])
    lines += ["", paired.legend(reference)]
    s = index_of(groups, _named("", "smooth=true", "smoothed"))
    c = index_of(groups, _named("", "smooth=false", "calibrated"))
    if s < 0 or c < 0:
        return lines, "The Tf-KD cells are missing: the claim cannot be judged."
    gaps = [g for g in (confidence_gap(r) for r in groups[s].runs) if g is not None and math.isfinite(g)]
    under = paired.differences(gaps, [0.0] * len(gaps))  # the smoothed students' gap against 0
    paired.holm_fill([under])
    closer = one_pair(groups[c], groups[s], lambda r: _abs(confidence_gap(r)))  # |gap|: calibrated - smoothed
    held = under.settled and under.mean < 0 and closer.settled and closer.mean < 0
    calib = stat(groups[c], confidence_gap)[1]
    verdict = (f"The smoothed virtual teacher leaves its students {'under' if under.mean < 0 else 'over'}-confident, "
               f"{noise(under)}, and the calibrated one "
               f"{'closer to' if held else 'no closer to'} calibration ({100 * calib:+.2f} pp; the size of its gap "
               f"minus the smoothed one's: {noise(closer)}): the claim {'holds' if held else 'does not hold'} here.")
    return lines, verdict


def _abs(value: float | None) -> float | None:
    return None if value is None else abs(value)


def instability(groups: list[Group], reference: str = "kd") -> tuple[list[str], str]:
    """DML's and PCL's epoch-to-epoch val oscillation against KD's, paired by seed."""
    lines, diffs = paired_table(
        groups, reference,
        [("test top-1 %", lambda g: stat(g, metric("top1"))[0]),
         ("val top-1 change per epoch (pp)", lambda g: stat(g, oscillation)[0]),
         ("peer disagreement (KL)", lambda g: stat(g, disagreement, 1.0)[0])],
        [("top-1", metric("top1")), ("change per epoch", oscillation)])
    lines += ["", paired.legend(reference)]
    dml = index_of(groups, lambda g: g.settings.get("algo") == "dml")
    pcl = index_of(groups, lambda g: g.settings.get("algo") == "pcl")
    if dml < 0 or dml not in diffs[1]:
        return lines, f"No DML cell paired with `{reference}`: the claim cannot be judged."
    d = diffs[1][dml]
    held = d.settled and d.mean > 0
    kd = stat(diffs_reference(groups, reference, dml), oscillation)[1]
    verdict = (f"DML's students move {100 * stat(groups[dml], oscillation)[1]:.2f} pp per epoch on val against "
               f"KD's {100 * kd:.2f}: DML {'is' if held else 'is not clearly'} less stable than KD here, the "
               f"difference being {noise(d)}.")
    if pcl >= 0:
        steady = one_pair(groups[pcl], groups[dml], oscillation)
        calmer = steady.settled and steady.mean < 0
        verdict += (f" PCL's students move {100 * stat(groups[pcl], oscillation)[1]:.2f} pp: its mean teachers "
                    f"{'steady' if calmer else 'do not steady'} the cohort (PCL minus DML: {noise(steady)}).")
    return lines, verdict


def cross_quality(groups: list[Group], reference: str = "baseline") -> tuple[list[str], str]:
    """Students reading downscaled images, each cell paired with the reference of its own student size."""
    order = sorted(groups, key=lambda g: (g.settings.get("student_resolution") or 0, g.label))
    lines, diffs = paired_table(
        order, reference,
        [("student px", lambda g: str(g.settings.get("student_resolution"))),
         ("test top-1 %", lambda g: stat(g, metric("top1"))[0]), ("test ECE %", lambda g: stat(g, metric("ece"))[0])],
        [("top-1", metric("top1")), ("ECE", metric("ece"))], versus=f"{reference} at its size")
    lines += ["", paired.legend(reference) + f" Each cell is paired with the `{reference}` of its own student size."]
    kd = {g.settings.get("student_resolution"): diffs[0].get(i) for i, g in enumerate(order)
          if g.settings.get("algo") == "kd"}
    wins = [px for px, d in kd.items() if d is not None and d.settled and d.mean > 0]
    verdict = (f"KD with a full-resolution teacher beats the student alone beyond the seeds' noise at {len(wins)} "
               f"of {len(kd)} student sizes ("
               + "; ".join(f"{px} px: {noise(d)}" for px, d in sorted(kd.items(), key=lambda t: t[0] or 0)) + ").")
    return lines, verdict


def _effect(result: Paired | None, better: str, worse: str, sign: float = 1.0) -> str:
    """``better`` or ``worse`` when ``result`` is beyond the seeds' noise (``sign``: -1 where lower is better)."""
    if result is None or not result.settled:
        return "made no difference beyond the seeds' noise to"
    return better if sign * result.mean > 0 else worse


def calibrated_teacher(groups: list[Group], reference: str = "kd") -> tuple[list[str], str]:
    """KD from a raw vs a temperature-scaled teacher (paired with the raw one's cell), beside the baseline and the
    baseline + temperature scaling."""
    from distillistic.training.calibrate import calibrate_run  # the reference every calibration claim needs

    refs = paired.named(groups, reference)
    diffs = [paired.compare(groups, reference, metric(k)) for k in ("top1", "ece")]
    lines = header(["cell", "teacher T_cal", "teacher test ECE %", "test top-1 %", "test ECE %", "test NLL",
                    *delta_head(reference, ["top-1", "ECE"]), "seeds"])
    ts_ece = math.nan
    for i, g in enumerate(groups):
        t_cal = stat(g, lambda r: (r.summary["models"].get("teacher") or {}).get("calibration_temperature"), 1.0)
        lines.append(f"| {g.label} | {t_cal[0]} | {stat(g, lambda r: teacher_test(r, 'ece'))[0]} | "
                     f"{stat(g, metric('top1'))[0]} | {stat(g, metric('ece'))[0]} | {stat(g, metric('nll'), 1.0)[0]}"
                     f" | {' | '.join(delta_cells(diffs, i, any(g is r for r in refs)))} | {g.seeds} |")
        if g.settings.get("algo") == "baseline":
            after = [calibrate_run(r.path)["models"]["student"]["test"]["after"] for r in g.runs]
            m_ece, s_ece, _ = mean_std(a["ece"] for a in after)
            m_nll, s_nll, _ = mean_std(a["nll"] for a in after)
            ts_ece = m_ece
            lines.append(f"| baseline + temperature scaling | – | – | {stat(g, metric('top1'))[0]} | "
                         f"{pm(m_ece, s_ece, 100)} | {pm(m_nll, s_nll, 1.0)} | – | – | – | – | {g.seeds} |")
    cal = index_of(groups, _named("", "calibrated", "temperature"))
    if not refs or cal < 0 or cal not in diffs[0]:
        return lines, "The KD cells are missing: the claim cannot be judged."
    t_fit = stat(groups[cal], lambda r: (r.summary["models"].get("teacher") or {}).get("calibration_temperature"))[1]
    lines += [f"\nTeacher test top-1: {teacher_top1(groups)} %.", "", paired.legend(reference)]
    top1, ece = diffs[0][cal], diffs[1][cal]
    raw = diffs_reference(groups, reference, cal)
    nll = stat(groups[cal], metric("nll"), 1.0)[1] - stat(raw, metric("nll"), 1.0)[1]
    kind = "over-confident: T > 1 softens it" if t_fit > 1 else "under-confident: T < 1 sharpens it"
    verdict = (f"The teacher's fitted temperature is {t_fit:.2f} ({kind}). Calibrating it, the KD students' difference "
               f"in test top-1 is {noise(top1)}, in ECE {noise(ece)}, and in NLL {nll:+.3f} (means): calibrating the "
               f"teacher {_effect(top1, 'helped', 'hurt')} accuracy and {_effect(ece, 'helped', 'hurt', -1.0)} "
               f"calibration here. The baseline with temperature scaling reaches an ECE of {100 * ts_ece:.2f} %.")
    return lines, verdict
