"""The offline demo: the README's MNIST setting in miniature, on the digits shipped with the package.

An ``mlp`` student trained alone, KD from a ``cnn_wide`` teacher trained first, DML, and Tf-KD's two virtual
teachers, over several seeds; one line per run, then the table, the report with its figures, and where they are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from distillistic.config import Config
from distillistic.errors import shown
from distillistic.experiments import paired
from distillistic.experiments.comparison import Entry, entries, paired_rows
from distillistic.experiments.report import find_runs, finished_summary, group_runs, write_report
from distillistic.experiments.results import Group, mean_std, pm
from distillistic.fileio import atomic_write_json

log = logging.getLogger("distillistic")

TRAIN_SAMPLES = 2000  # of the 7,000 training digits: a student that has something to learn from the teacher
TEACHER = {"teacher": "cnn_wide", "teacher_weights": "train", "teacher_epochs": 4, "teacher_seed": 0}
DEMO_ALGOS: dict[str, dict[str, object]] = {
    "baseline": {"algo": "baseline"},
    "kd": {"algo": "kd", **TEACHER, "temperature": 4.0},
    "dml": {"algo": "dml", "students": 2, "temperature": 1.0},
    "tfkd (smoothed)": {"algo": "tfkd", "virtual_smooth": True, "temperature": 20.0},
    "tfkd (calibrated)": {"algo": "tfkd", "virtual_smooth": False, "temperature": 1.0},
}
# The demo's command-line help (written here, beside its cells: the CLI names no method).
HELP = ("offline demo on the MNIST digits shipped with distillistic: an mlp student alone, KD from a cnn_wide teacher, "
        "DML, Tf-KD's two virtual teachers; 3 seeds, report")
ALGOS_HELP = (f"a subset of: {' '.join(dict.fromkeys(str(c['algo']) for c in DEMO_ALGOS.values()))} "
              f"(default: all {len(DEMO_ALGOS)} cells)")


def demo_config(out: str, epochs: int) -> Config:
    """The settings every demo run shares: the shipped MNIST t10k digits, plain views, ``mlp`` students."""
    return Config(dataset="mnist-t10k", max_train_samples=TRAIN_SAMPLES, augment="none", model="mlp",
                  epochs=epochs, batch_size=64, lr=3e-3, optimizer="adamw", scheduler="onecycle", data_seed=0,
                  progress=False, tensorboard=False, overwrite=True,
                  cache_dir=str(Path(out).resolve() / "cache"))


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the runs' own lines (start, epochs, teacher) unless ``verbose``: the demo says one line per run."""
    logger = logging.getLogger("distillistic")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _plan(algos: list[str] | None) -> list[str]:
    return [label for label in DEMO_ALGOS if not algos or label.split(" ")[0] in algos or label in algos]


def run_demo(out: str, seeds: int = 3, epochs: int = 5, algos: list[str] | None = None, verbose: bool = False,
             report: bool = True, settings: Mapping[str, Any] | None = None) -> str:
    """Train each algorithm with ``seeds`` seeds; write the report (``out/report``); return the results table.
    ``settings`` overrides config keys of every run (a smaller demo, for tests)."""
    from distillistic.training.run import train

    settings = dict(settings or {})
    base = demo_config(out, epochs).replace(**{k: v for k, v in settings.items() if k not in TEACHER})
    labels = _plan(algos)
    total = len(labels) * seeds
    log.info("demo: %d runs (%s; %d seed%s each) on the MNIST digits shipped with distillistic (%d training "
             "digits, plain views, %d epochs of an mlp student), into %s%s", total, ", ".join(labels), seeds,
             "s" * (seeds != 1), base.max_train_samples, epochs, shown(out),
             f"; KD's teacher ({TEACHER['teacher']}, {TEACHER['teacher_epochs']} epochs) is trained first"
             if "kd" in labels else "")
    runs: dict[str, list[Path]] = {}
    cells: list[dict[str, object]] = []  # plan.json: 'distillistic report' labels the cells by these names
    done = 0
    for label in labels:
        for seed in range(seeds):
            folder = Path(out) / label.replace(" ", "_").replace("(", "").replace(")", "") / f"seed{seed}"
            cells.append({"name": f"{folder.parent.name}/{folder.name}", "settings": {"variant": label, "seed": seed}})
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(out) / "plan.json", {"source": "distillistic demo", "cells": cells})
            started = time.perf_counter()
            with _quiet(verbose):
                algo = DEMO_ALGOS[label]
                algo = {k: settings.get(k, v) if k in TEACHER else v for k, v in algo.items()}
                train(base.replace(seed=seed, out=str(folder), **algo))
            done += 1
            runs.setdefault(label, []).append(folder)
            log.info("[%*d/%d] %s", len(str(total)), done, total, _run_line(label, seed, folder,
                                                                              time.perf_counter() - started))
    text = paired_table([p for folders in runs.values() for p in folders]) + _teacher_line(runs)
    if report:
        write_report([out])
    return text


def paired_table(folders: list[Path], reference: str = "baseline") -> str:
    """The demo's table: each algorithm over its seeds (a cohort twice: its students' mean and its ensemble),
    with its paired difference to ``reference`` in test top-1 and ECE, and what the differences say."""
    groups = sorted(group_runs(find_runs(folders)[0]), key=_place)
    items = entries(groups)
    diffs = [paired_rows(items, groups, reference, m) for m in ("top1", "ece")]
    refs = paired.named(groups, reference)
    head = ["algorithm", "n", "test top-1 (%)", "ECE (%)", "NLL", "entropy (nats)",
            f"Δ top-1 vs {reference} (pp) [95 % CI]", "p (Holm)", f"Δ ECE vs {reference} (pp) [95 % CI]",
            "p (Holm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, e in enumerate(items):
        cells = [_name(e), str(len(e.runs)), pm(*e.stat(e.metric("top1")), 100.0), pm(*e.stat(e.metric("ece")), 100.0),
                 pm(*e.stat(e.metric("nll")), 1.0, 3), pm(*e.stat(e.metric("entropy")), 1.0, 3)]
        cells += [c for d in diffs for c in paired.columns(d.get(i), any(e.group is g for g in refs))]
        lines.append("| " + " | ".join(cells) + " |")
    if not diffs[0]:
        return "\n".join(lines) + f"\n\nNo paired differences: no `{reference}` cell shares seeds with the others."
    return "\n".join([*lines, "", paired.legend(reference), "", _noise_line(items, diffs[0], reference)])


def _place(group: Group) -> int:
    labels = list(DEMO_ALGOS)
    return labels.index(group.label) if group.label in labels else len(labels)


def _name(e: Entry) -> str:
    return e.label if e.kind == "student" else f"{e.label} ({e.kind})"


def _noise_line(items: list[Entry], diffs: dict[int, paired.Paired], reference: str) -> str:
    """Which rows differ from the reference in test top-1 beyond the seeds' noise (interval and corrected test),
    which only by the sign of every seed's difference, and which within the noise."""
    def rows(test: Callable[[paired.Paired], bool]) -> str:
        return ", ".join(f"{_name(items[i])} ({100 * d.mean:+.2f} pp)" for i, d in diffs.items() if test(d)) or "none"

    return (f"Test top-1 against {reference}, paired by seed: beyond the seeds' noise: {rows(lambda d: d.settled)}; "
            f"of one sign on every seed, not confirmed by the corrected test: "
            f"{rows(lambda d: d.excludes_zero and not d.settled)}; within the noise: "
            f"{rows(lambda d: not d.excludes_zero)}.")


def _run_line(label: str, seed: int, folder: Path, seconds: float) -> str:
    """``kd, seed 0: student test top-1 94.10 %, ECE 2.31 % (12 s)``: what one run reached."""
    summary = finished_summary(folder)
    models = summary.get("models") or {}
    test = (summary.get("cohort_mean") or {}).get("test") or (models.get("student") or {}).get("test") or {}
    who = "students' mean" if "cohort_mean" in summary else "student"
    line = f"{label}, seed {seed}: {who} test top-1 {100 * test.get('top1', float('nan')):.2f} %, " \
           f"ECE {100 * test.get('ece', float('nan')):.2f} % ({seconds:.0f} s)"
    teacher = (models.get("teacher") or {}).get("test") or {}
    if "top1" in teacher:
        line += f"; teacher {100 * teacher['top1']:.2f} %"
    return line


def _top1(folder: Path, model: str) -> float | None:
    value = ((finished_summary(folder).get("models") or {}).get(model) or {}).get("test", {}).get("top1")
    return value if isinstance(value, float) else None


def _teacher_line(runs: dict[str, list[Path]]) -> str:
    """How strong the teachers were: their test top-1 (a KD student can only gain from a better teacher), and
    what that means when the students alone are as good."""
    mean, std, n = mean_std(_top1(r, "teacher") for folders in runs.values() for r in folders)
    if not n:
        return ""
    line = (f"\n\nteacher ({TEACHER['teacher']}, trained first on the same digits): test top-1 "
            f"{pm(mean, std, 100)} % over {n} runs")
    alone, _, k = mean_std(_top1(r, "student") for r in runs.get("baseline", []))
    if k and alone >= mean:
        line += (f", no better than the student trained alone ({100 * alone:.2f} %): KD has nothing to add "
                 "with such a teacher. 'distillistic reproduce hinton' shows KD with a teacher clearly stronger "
                 "than its student")
    return line


def next_steps(out: str) -> list[str]:
    """The lines the CLI prints after the table: where the report is and what to run next."""
    report = Path(shown(out)) / "report"
    return [f"report: {report / 'report.md'} (figures in {report / 'figures'})",
            f"runs: {shown(out)}/<algorithm>/seed<k> (each with summary.json, metrics.jsonl, checkpoints/)",
            "next:",
            "  distillistic train --algo kd --dataset mnist-t10k --max-train-samples 2000 --augment none "
            "--batch-size 64 --lr 3e-3 --model mlp --teacher cnn --teacher-epochs 6 --temperature 4 --epochs 5 "
            "--out runs/kd   # one run (README: Train)",
            "  distillistic reproduce hinton     # a thesis claim re-measured, with its table and figures",
            "  distillistic list algos           # every method, with its reference and formula"]
