"""The offline demo: every algorithm on scikit-learn's digits, several seeds, one table."""

from __future__ import annotations

from pathlib import Path

from distillistic.config import Config
from distillistic.experiments.report import format_table, read_summary, summarize_runs
from distillistic.experiments.results import mean_std, pm
from distillistic.fileio import atomic_write_json
from distillistic.training.run import train

DEMO_ALGOS: dict[str, dict[str, object]] = {
    "baseline": {"algo": "baseline"},
    "kd": {"algo": "kd", "teacher": "cnn_wide", "temperature": 4.0},
    "dml": {"algo": "dml", "students": 3},
    "dml_e": {"algo": "dml_e", "students": 3},
    "tfkd (smoothed)": {"algo": "tfkd", "virtual_smooth": True},
    "tfkd (calibrated)": {"algo": "tfkd"},
}


def run_demo(out: str, seeds: int = 3, epochs: int = 12, algos: list[str] | None = None) -> str:
    """Train each algorithm on ``digits`` with ``seeds`` seeds; return the results table (markdown)."""
    base = Config(dataset="digits", model="cnn", epochs=epochs, batch_size=64, lr=3e-3, progress=False,
                  tensorboard=False, overwrite=True, cache_dir=str(Path(out).resolve() / "cache"))
    runs: dict[str, list[Path]] = {}
    cells: list[dict[str, object]] = []  # plan.json: 'distillistic report' labels the cells by these names
    for label, settings in DEMO_ALGOS.items():
        if algos and label.split(" ")[0] not in algos and label not in algos:
            continue
        for seed in range(seeds):
            folder = Path(out) / label.replace(" ", "_").replace("(", "").replace(")", "") / f"seed{seed}"
            cells.append({"name": f"{folder.parent.name}/{folder.name}", "settings": {"variant": label, "seed": seed}})
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(out) / "plan.json", {"source": "distillistic demo", "cells": cells})
            train(base.replace(seed=seed, out=str(folder), **settings))
            runs.setdefault(label, []).append(folder)
    return format_table(summarize_runs(runs)) + _teacher_line(runs)


def _top1(folder: Path, model: str) -> float | None:
    value = ((read_summary(folder).get("models") or {}).get(model) or {}).get("test", {}).get("top1")
    return value if isinstance(value, float) else None


def _teacher_line(runs: dict[str, list[Path]]) -> str:
    """How strong the teachers were: their test top-1 (a KD student can only gain from a better teacher), and
    what that means when the students alone are as good."""
    mean, std, n = mean_std(_top1(r, "teacher") for folders in runs.values() for r in folders)
    if not n:
        return ""
    line = f"\n\nteacher (cnn_wide, trained first on the same data): test top-1 {pm(mean, std, 100)} % over {n} runs"
    alone, _, k = mean_std(_top1(r, "student") for r in runs.get("baseline", []))
    if k and alone >= mean:
        line += (f", no better than the student trained alone ({100 * alone:.2f} %): on digits' 8 x 8 images a "
                 "small cnn reaches the teacher, so KD has nothing to add here. 'distillistic reproduce hinton' "
                 "shows KD with a teacher clearly stronger than its student (README: measured on MNIST t10k)")
    return line
