"""``distillistic reproduce CLAIM``: each thesis claim re-measured by one command, with its table and figures.

A claim is a small sweep (several seeds) on offline data plus the table that answers its question:

* on MNIST t10k when its files are at ``--data-root`` (default ``../shared/datasets/mnist-t10k``), else on
  scikit-learn's digits, which ship with the package; ``--full`` selects the thesis-scale setting
  (Fashion-MNIST, 20 epochs; a GPU's work) for the claims that have one;
* every run lands in ``<out>/<claim>/runs`` (a sweep: re-running the command skips finished cells and resumes
  interrupted ones), the report with its figures in ``<out>/<claim>/report``, and the claim's own table in
  ``<out>/<claim>/claim.md``, which is also printed.

The table says in words whether the claim held at this scale; a claim that did not hold is reported as
such, never hidden.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillistic.errors import UserError
from distillistic.experiments import sum_of_parts
from distillistic.experiments.dml_identity import dml_identity
from distillistic.experiments.report import find_runs, group_runs, write_report
from distillistic.experiments.results import Group, Run, mean_std, pm
from distillistic.experiments.sweep import describe, run_sweep
from distillistic.fileio import atomic_write_text

log = logging.getLogger("distillistic")
MNIST_T10K = Path("../shared/datasets/mnist-t10k")
SEEDS = [0, 1, 2]

Table = Callable[[list[Group]], tuple[list[str], str]]  # groups -> (markdown lines, verdict)


@dataclass(frozen=True)
class Claim:
    name: str
    question: str
    base: Mapping[str, Any]  # sweep keys shared by every cell (on top of the data settings)
    variants: Mapping[str, Mapping[str, Any]]
    table: Table
    grid: Mapping[str, Sequence[Any]] | None = None
    full: Mapping[str, Any] | None = None  # the thesis-scale overrides (``--full``)
    measure: Callable[[Mapping[str, Any]], tuple[list[str], str]] | None = None  # instead of a sweep: base -> table
    reference: str | None = None  # the report's paired reference cell (default: the baseline)
    # A teacher of the claim's own, trained first as a baseline run with these keys (on top of the claim's data
    # and optimiser) into ``<out>/<claim>/teacher``; every cell reads it as ``teacher_weights``.
    teacher_run: Mapping[str, Any] | None = None


def _data(data_root: str | None, full: bool) -> dict[str, Any]:
    if full:
        return {"dataset": "fashion-mnist", "epochs": 20, "batch_size": 256}
    root = Path(data_root) if data_root else MNIST_T10K
    if (root / "t10k-images-idx3-ubyte.gz").is_file() or (root / "t10k-images-idx3-ubyte").is_file():
        return {"dataset": "mnist", "data_root": str(root.resolve()), "max_train_samples": 3000}
    if data_root:
        raise UserError(f"--data-root '{data_root}' holds no MNIST t10k files (t10k-images-idx3-ubyte.gz); pass "
                        "the folder that holds them, or leave --data-root out to use scikit-learn's digits")
    log.info("reproduce: %s not found; using scikit-learn's digits", MNIST_T10K)
    return {"dataset": "digits"}


# The claims are about teaching signals, not augmentation: plain views and enough steps that the students fit
# (with RandAugment and 3,000 images, 6 epochs leave every model, the baseline too, far under-confident).
COMMON = {"progress": False, "tensorboard": False, "data_seed": 0, "teacher_seed": 0, "lr": 3e-3,
          "batch_size": 64, "optimizer": "adamw", "scheduler": "onecycle", "augment": "none"}
# One teacher for every claim that has one (trained once, then read from the cache by the others and by
# configs/mnist_t10k_comparison.yaml): a cnn_wide that is clearly stronger than the cnn and mlp students.
TEACHER = {"teacher": "cnn_wide", "teacher_weights": "train", "teacher_epochs": 10}
# The calibrated-teacher claim needs a teacher that calibration can correct: the shared cnn_wide is calibrated
# already (its fitted temperature is 0.97). This one is over-confident by its recipe: an mlp trained 30 epochs,
# five times the students' 6, with no weight decay, on the claim's images and schedule (fitted T 2.28 here).
OVERCONFIDENT_TEACHER = {"model": "mlp", "epochs": 30, "weight_decay": 0.0}


# --- what each claim's table reads ---------------------------------------------------------------------


def _test(run: Run) -> dict[str, Any]:
    """The run's student test metrics (a cohort: the mean of its students)."""
    if run.cohort:
        return dict((run.summary.get("cohort_mean") or {}).get("test") or {})
    return dict((run.summary["models"].get("student") or {}).get("test") or {})


def _confidence_gap(run: Run) -> float | None:
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


def _stat(group: Group, fn: Callable[[Run], float | None], scale: float = 100.0) -> tuple[str, float]:
    mean, std, _ = mean_std(fn(r) for r in group.runs)
    return pm(mean, std, scale), mean


def _metric(key: str) -> Callable[[Run], float | None]:
    return lambda run: _test(run).get(key)


def _teacher_top1(groups: list[Group]) -> str:
    values = [((r.summary["models"].get("teacher") or {}).get("test") or {}).get("top1")
              for g in groups for r in g.runs]
    mean, std, n = mean_std(values)
    return pm(mean, std, 100.0) if n else "–"


def _header(cols: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _hinton(groups: list[Group]) -> tuple[list[str], str]:
    lines = _header(["cell", "test top-1 %", "test ECE %", "test NLL", "seeds"])
    top1 = {}
    for g in groups:
        text, top1[g.label] = _stat(g, _metric("top1"))
        lines.append(f"| {g.label} | {text} | {_stat(g, _metric('ece'))[0]} | "
                     f"{_stat(g, _metric('nll'), 1.0)[0]} | {g.seeds} |")
    lines.append(f"\nTeacher test top-1: {_teacher_top1(groups)} %.")
    kd = next((v for k, v in top1.items() if "kd" in k), math.nan)
    base = next((v for k, v in top1.items() if "baseline" in k), math.nan)
    held = kd > base
    verdict = (f"KD {'beats' if held else 'does not beat'} the student trained alone here "
               f"({100 * kd:.2f} vs {100 * base:.2f} % mean test top-1).")
    return lines, verdict


def _smoothing(groups: list[Group]) -> tuple[list[str], str]:
    lines = _header(["cell", "test top-1 %", "test ECE %", "entropy", "confidence − accuracy (pp)",
                     "signal entropy", "seeds"])
    gaps = {}
    for g in groups:
        gap, gaps[g.label] = _stat(g, _confidence_gap)
        signal = _stat(g, lambda r: _last_train(r, "tfkd_target_entropy"), 1.0)[0]
        lines.append(f"| {g.label} | {_stat(g, _metric('top1'))[0]} | {_stat(g, _metric('ece'))[0]} | "
                     f"{_stat(g, _metric('entropy'), 1.0)[0]} | {gap} | {signal} | {g.seeds} |")
    smooth = next((v for k, v in gaps.items() if "smooth=true" in k or "smoothed" in k), math.nan)
    calib = next((v for k, v in gaps.items() if "smooth=false" in k or "calibrated" in k), math.nan)
    held = smooth < 0 and abs(calib) < abs(smooth)
    verdict = (f"The smoothed virtual teacher leaves its students {'under' if smooth < 0 else 'over'}-confident "
               f"({100 * smooth:+.2f} pp) and the calibrated one {'closer to' if held else 'no closer to'} "
               f"calibration ({100 * calib:+.2f} pp): the claim {'holds' if held else 'does not hold'} here.")
    return lines, verdict


def _last_train(run: Run, key: str, model: str = "student") -> float | None:
    rows = [r for r in run.history if r.get("split") == "train" and r.get("model", "").startswith(model)
            and r.get(key) is not None]
    return rows[-1][key] if rows else None


def _oscillation(run: Run) -> float | None:
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


def _disagreement(run: Run) -> float | None:
    rows = [r["pairwise_kl"] for r in run.history if r.get("model") == "cohort" and r.get("split") == "train"]
    return statistics.fmean(rows) if rows else None


def _instability(groups: list[Group]) -> tuple[list[str], str]:
    lines = _header(["cell", "test top-1 %", "val top-1 change per epoch (pp)", "peer disagreement (KL)",
                     "seeds"])
    osc = {}
    for g in groups:
        text, osc[g.label] = _stat(g, _oscillation)
        lines.append(f"| {g.label} | {_stat(g, _metric('top1'))[0]} | {text} | "
                     f"{_stat(g, _disagreement, 1.0)[0]} | {g.seeds} |")
    dml = next((v for k, v in osc.items() if "dml" in k), math.nan)
    kd = next((v for k, v in osc.items() if k.endswith("kd") or "=kd" in k), math.nan)
    pcl = next((v for k, v in osc.items() if "pcl" in k), math.nan)
    held = dml > kd
    verdict = (f"DML's students move {100 * dml:.2f} pp per epoch on val against KD's {100 * kd:.2f} and PCL's "
               f"{100 * pcl:.2f}: DML {'is' if held else 'is not'} less stable than KD here, and PCL's mean "
               f"teachers {'steady' if pcl < dml else 'do not steady'} the cohort.")
    return lines, verdict


def _cross_quality(groups: list[Group]) -> tuple[list[str], str]:
    lines = _header(["cell", "student px", "test top-1 %", "test ECE %", "seeds"])
    best: dict[Any, tuple[str, float]] = {}
    for g in sorted(groups, key=lambda g: (g.settings.get("student_resolution") or 0, g.label)):
        text, mean = _stat(g, _metric("top1"))
        px = g.settings.get("student_resolution")
        lines.append(f"| {g.label} | {px} | {text} | {_stat(g, _metric('ece'))[0]} | {g.seeds} |")
        if px not in best or mean > best[px][1]:
            best[px] = (str(g.settings.get("algo")), mean)
    wins = sum(1 for algo, _ in best.values() if algo == "kd")
    verdict = (f"KD with a full-resolution teacher is the best cell at {wins} of {len(best)} student sizes "
               f"(best per size: {', '.join(f'{px} px: {a}' for px, (a, _) in sorted(best.items()))}).")
    return lines, verdict


def _teacher_test(run: Run, key: str) -> float | None:
    return ((run.summary["models"].get("teacher") or {}).get("test") or {}).get(key)


def _effect(delta: float, spread: float, better: str, worse: str) -> str:
    """``better`` or ``worse`` when ``delta`` (positive: better) exceeds the seeds' ``spread``, else no effect."""
    if math.isfinite(spread) and abs(delta) <= spread:
        return "made no difference beyond the seeds' spread to"
    return better if delta > 0 else worse


def _calibrated_teacher(groups: list[Group]) -> tuple[list[str], str]:
    """KD from a raw vs a temperature-scaled teacher, beside the baseline and the baseline + temperature scaling."""
    from distillistic.training.calibrate import calibrate_run  # the reference every calibration claim needs

    lines = _header(["cell", "teacher T_cal", "teacher test ECE %", "test top-1 %", "test ECE %", "test NLL",
                     "seeds"])
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for g in groups:
        t_cal = _stat(g, lambda r: ((r.summary["models"].get("teacher") or {}).get("calibration_temperature")), 1.0)
        stats[g.label] = {k: mean_std(_metric(k)(r) for r in g.runs)[:2] for k in ("top1", "ece", "nll")}
        lines.append(f"| {g.label} | {t_cal[0]} | {_stat(g, lambda r: _teacher_test(r, 'ece'))[0]} | "
                     f"{_stat(g, _metric('top1'))[0]} | {_stat(g, _metric('ece'))[0]} | "
                     f"{_stat(g, _metric('nll'), 1.0)[0]} | {g.seeds} |")
        if g.settings.get("algo") == "baseline":
            after = [calibrate_run(r.path)["models"]["student"]["test"]["after"] for r in g.runs]
            m_ece, s_ece, _ = mean_std(a["ece"] for a in after)
            m_nll, s_nll, _ = mean_std(a["nll"] for a in after)
            stats["baseline + TS"] = {"ece": (m_ece, s_ece)}
            lines.append(f"| baseline + temperature scaling | – | – | {_stat(g, _metric('top1'))[0]} | "
                         f"{pm(m_ece, s_ece, 100)} | {pm(m_nll, s_nll, 1.0)} | {g.seeds} |")
    raw = next((k for k in stats if k.endswith("kd") or k == "algo=kd"), "")
    cal = next((k for k in stats if "calibrated" in k or "temperature" in k), "")
    if not raw or not cal:
        return lines, "The KD cells are missing: the claim cannot be judged."
    t_fit = mean_std(((r.summary["models"].get("teacher") or {}).get("calibration_temperature"))
                     for g in groups if g.label == cal for r in g.runs)[0]
    lines.append(f"\nTeacher test top-1: {_teacher_top1(groups)} %.")
    d = {k: stats[cal][k][0] - stats[raw][k][0] for k in ("top1", "ece", "nll")}
    spread = {k: max(stats[cal][k][1], stats[raw][k][1]) for k in d}
    kind = "over-confident: T > 1 softens it" if t_fit > 1 else "under-confident: T < 1 sharpens it"
    ts_ece = stats.get("baseline + TS", {}).get("ece", (math.nan,))[0]
    verdict = (f"The teacher's fitted temperature is {t_fit:.2f} ({kind}). Calibrating it "
               f"changes the KD student's test top-1 by {100 * d['top1']:+.2f} pp, its ECE by {100 * d['ece']:+.2f} pp "
               f"and its NLL by {d['nll']:+.3f}: calibrating the teacher "
               f"{_effect(d['top1'], spread['top1'], 'helped', 'hurt')} accuracy and "
               f"{_effect(-d['ece'], spread['ece'], 'helped', 'hurt')} calibration here. The baseline with "
               f"temperature scaling reaches an ECE of {100 * ts_ece:.2f} %.")
    return lines, verdict


CLAIMS: dict[str, Claim] = {c.name: c for c in (
    Claim("hinton", "Does a KD student beat the same student trained alone, given a converged teacher?",
          {"model": "mlp", "epochs": 6, "temperature": 4.0, "alpha": 0.7, **TEACHER},
          {"baseline": {"algo": "baseline"}, "kd": {"algo": "kd"}}, _hinton),
    Claim("tfkd-smoothing", "Does the smoothed virtual teacher make students under-confident, the calibrated "
          "one not?", {"model": "mlp", "epochs": 6},
          {"baseline": {"algo": "baseline"}, "tfkd_smoothed": {"algo": "tfkd", "virtual_smooth": True},
           "tfkd_calibrated": {"algo": "tfkd", "virtual_smooth": False}}, _smoothing),
    Claim("dml-instability", "Is DML less stable than KD, and do PCL's temporal mean teachers steady it (val accuracy "
          "oscillation, peer disagreement)?",
          {"model": "mlp", "epochs": 8, **TEACHER},
          {"kd": {"algo": "kd", "temperature": 4.0}, "dml": {"algo": "dml", "students": 2},
           "pcl": {"algo": "pcl", "students": 2, "pcl_decay": 0.99}}, _instability),
    Claim("cross-quality", "Does a full-resolution teacher help students that read downscaled images?",
          {"model": "mlp", "epochs": 5, **TEACHER},
          {"baseline": {"algo": "baseline"}, "kd": {"algo": "kd", "temperature": 4.0},
           "dml": {"algo": "dml", "students": 2}}, _cross_quality, grid={"student_resolution": [7, 14]}),
    Claim("calibrated-teacher", "Does a temperature-scaled teacher teach better than the raw one (and how does "
          "it compare with the baseline + temperature scaling)?",
          {"model": "mlp", "epochs": 6, "temperature": 4.0},
          {"baseline": {"algo": "baseline"}, "kd": {"algo": "kd"},
           "kd_calibrated": {"algo": "kd", "teacher_calibration": "temperature"}}, _calibrated_teacher,
          teacher_run=OVERCONFIDENT_TEACHER),
    Claim("sum-of-parts", "At equal training compute, is an online-distillation cohort (DML, DML_e, KDCL, PCL) "
          "greater than the sum of its parts: one student given the whole budget, independent students and their "
          "ensemble, one wider student, KD with its teacher's training counted?",
          sum_of_parts.BASE, sum_of_parts.variants(), sum_of_parts.table, reference="alone"),
    Claim("dml-equals-dml-e", "Do DML and DML_e train identically from the same seed (their gradients are equal)?",
          {"batch_size": 64}, {}, lambda groups: ([], ""), measure=dml_identity),
)}


def sweep_spec(claim: Claim, data_root: str | None = None, full: bool = False,
               overrides: Mapping[str, Any] | None = None, teacher: Path | None = None) -> dict[str, Any]:
    """The claim's sweep file as a mapping (written beside its runs as ``sweep.yaml``); ``overrides`` (keys
    of every cell, e.g. a shorter run in the tests) come last; ``teacher``: the folder of the claim's own
    teacher (:attr:`Claim.teacher_run`)."""
    data = {"dataset": "digits"} if (overrides or {}).get("dataset") == "digits" else _data(data_root, full)
    grid: dict[str, list[Any]] = {k: list(v) for k, v in (claim.grid or {}).items()}
    if data["dataset"] == "digits" and "student_resolution" in grid:
        grid["student_resolution"] = [4, 6]  # digits are 8 x 8
    base = {**COMMON, **data, **claim.base, **(claim.full if full and claim.full else {}), **(overrides or {})}
    if claim.teacher_run is not None:
        base |= {"teacher": claim.teacher_run["model"], "teacher_weights": str(teacher) if teacher else "train"}
    return {**base, "variants": {k: dict(v) for k, v in claim.variants.items()}, "grid": {**grid, "seed": SEEDS}}


def own_teacher(claim: Claim, folder: Path, data_root: str | None = None, full: bool = False,
                overrides: Mapping[str, Any] | None = None) -> Path:
    """Train the claim's own teacher (:attr:`Claim.teacher_run`) as a one-cell sweep in ``folder`` (re-running
    skips it when finished and resumes it when interrupted); return its run directory."""
    assert claim.teacher_run is not None
    data = {"dataset": "digits"} if (overrides or {}).get("dataset") == "digits" else _data(data_root, full)
    spec = {**COMMON, **data, "algo": "baseline", **claim.teacher_run, **(overrides or {})}
    seed = spec.pop("seed", 0)
    result = run_sweep({**spec, "grid": {"seed": [seed]}}, folder)
    if result.interrupted or result.failures:
        raise UserError(f"the claim's teacher did not finish ({describe(result).splitlines()[-1].strip()}); run the "
                        f"same command again to continue ({folder})")
    return (folder / result.outcomes[0].cell.name).resolve()


def reproduce(name: str, out: str | Path = "runs/reproduce", data_root: str | None = None,
              full: bool = False, overrides: Mapping[str, Any] | None = None) -> str:
    """Run claim ``name``'s sweep, its report and its table; return the table (markdown)."""
    if name not in CLAIMS:
        raise UserError(f"unknown claim '{name}'; choose one of: {', '.join(CLAIMS)}")
    claim = CLAIMS[name]
    folder = Path(out) / name
    if claim.measure is not None:  # measured directly, not by a sweep
        base = {k: v for k, v in sweep_spec(claim, data_root, full, overrides).items() if k not in ("variants", "grid")}
        lines, verdict = claim.measure(base)
        return _write(folder, name, claim, lines, verdict)
    teacher = own_teacher(claim, folder / "teacher", data_root, full, overrides) if claim.teacher_run else None
    result = run_sweep(sweep_spec(claim, data_root, full, overrides, teacher), folder / "runs")
    log.info("%s", describe(result))
    if result.interrupted or result.failures:
        raise UserError(f"reproduce {name}: {len(result.failures)} run(s) failed or the sweep was stopped; "
                        f"run the same command again to continue ({folder / 'runs'})")
    write_report([folder / "runs"], folder / "report", reference=claim.reference)
    runs, _ = find_runs([folder / "runs"])
    lines, verdict = claim.table(group_runs(runs))
    return _write(folder, name, claim, lines, verdict)


def _write(folder: Path, name: str, claim: Claim, lines: list[str], verdict: str) -> str:
    text = "\n".join([f"## {name}", "", claim.question, "", *lines, "", verdict, ""])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "claim.md", text)
    return text
