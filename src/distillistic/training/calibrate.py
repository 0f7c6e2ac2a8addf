"""``distillistic calibrate RUN_DIR``: temperature scaling of a finished run's models (Guo et al. 2017, sec. 4.2).

For every model of the run (each student at its best-on-val epoch, the probability-averaging ensemble of a cohort,
the frozen teacher) one temperature ``T = argmin_T NLL(softmax(z / T), y)`` is fitted on the **val** split
(:func:`~distillistic.core.calibration.fit_temperature`, LBFGS on ``log T``), then ECE, ACE, NLL and Brier of
``softmax(z)`` and ``softmax(z / T)`` are reported on val and on **test**. Temperature scaling never changes the
argmax, so top-1 stays as it was. The ensemble's logits are ``log mean_j softmax(z_j)``.

The data, models and teacher are rebuilt from the run's ``config.yaml`` (the teacher from its cache or weights,
as training did) and the students' ``checkpoints/best-*.pt``. The result goes to ``RUN_DIR/calibration.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.core.calibration import CalibrationAccumulator, fit_temperature, scale
from distillistic.core.metrics import MetricAccumulator
from distillistic.core.signals import StepInputs
from distillistic.data.datasets import data_root
from distillistic.data.loader import build_data
from distillistic.errors import UserError
from distillistic.fileio import atomic_write_json
from distillistic.runs.rundir import read_summary
from distillistic.runs.summary import clean
from distillistic.training import setup
from distillistic.training.checkpoint import read_state_dict, unwrap
from distillistic.training.engine import Member, Task
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime

REPORTED = ("ece", "ace", "nll", "brier", "top1")


def check_run(run_dir: Path) -> list[Path]:
    """The run's best-on-val checkpoints; :class:`UserError` for a path that is not a finished run with them."""
    if not run_dir.is_dir():
        raise UserError(f"calibrate: '{run_dir}' is not a directory; pass a run directory of 'distillistic train'")
    best = sorted((run_dir / "checkpoints").glob("best-*.pt"))
    if not best:
        raise UserError(f"calibrate: '{run_dir}' has no checkpoints/best-*.pt; it is not a run directory, or no "
                        "epoch has finished yet")
    status = read_summary(run_dir).get("status")
    if status != "completed":
        raise UserError(f"calibrate: run '{run_dir}' is not finished (summary status: {status or 'none'}); "
                        "resume it with 'distillistic train ... --resume' first")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"calibrate: '{run_dir}' has no config.yaml; it is not a run directory")
    return best


@torch.no_grad()
def collect_logits(task: Task, members: list[Member], split: str) -> tuple[dict[str, Tensor], Tensor]:
    """Logits ``[N, K]`` of every member (and ``ensemble``: ``log mean softmax`` of a cohort) and labels ``[N]``."""
    rt, cohort = task.rt, len(task.students) > 1
    for m in members:
        m.raw.eval()
    parts: dict[str, list[Tensor]] = {m.name: [] for m in members}
    labels = []
    for batch in task.loaders[split].epoch(0):
        y = batch.labels.to(rt.device)
        inp = StepInputs(task.views(batch, train=False), y, [], task.num_classes, 0, batch.index, split)
        with rt.autocast():
            for m in members:
                parts[m.name].append(m.eval_logits(inp).double())
        labels.append(y)
    task.objective.teaching.flush()  # a stored teacher's outputs recorded here
    logits = {name: torch.cat(z) if z else torch.zeros(0, task.num_classes, dtype=torch.float64)
              for name, z in parts.items()}
    if cohort:
        probs = torch.stack([F.softmax(logits[s.name], dim=1) for s in task.students]).mean(dim=0)
        logits["ensemble"] = probs.clamp_min(torch.finfo(torch.float64).tiny).log()
    return logits, torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def scores(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """ECE, ACE, NLL, Brier and top-1 of logits ``[N, K]`` against labels ``[N]`` (NaN when empty)."""
    metrics = MetricAccumulator(logits.shape[1], logits.device)
    cal = CalibrationAccumulator(logits.shape[1], device=logits.device)
    metrics.update(logits, labels)
    cal.update(logits, labels)
    out = metrics.compute() | {"ace": cal.compute()["ace"]}
    return {k: out[k] for k in REPORTED}


def _check_data(run_dir: Path, cfg: Config) -> None:
    """Refuse data other than the run was trained on (its checksum in ``manifest.json``), before any other work."""
    try:
        recorded = json.loads((run_dir / "manifest.json").read_text())["dataset"]["checksum"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    checksum = build_data(cfg).info.checksum
    if isinstance(recorded, str) and checksum and checksum != recorded:
        raise UserError(f"calibrate: the data in '{data_root(cfg)}' is not the data '{run_dir}' was trained on (its "
                        f"checksum differs from {run_dir / 'manifest.json'}'s); pass --data-root pointing at that "
                        "data")


def _load(run_dir: Path, device: str | None, data_root_: str | None = None, cache: str | None = None) -> Task:
    cfg = config_mod.load(run_dir / "config.yaml")
    where = {"device": device, "data_root": data_root_, "cache_dir": cache}
    cfg = cfg.replace(out=None, resume=False, overwrite=False, progress=False, tensorboard=False, wandb=False,
                      **{k: v for k, v in where.items() if v})
    cfg = setup.resolve(cfg)
    _check_data(run_dir, cfg)  # first: the teacher and the students are rebuilt on it
    task, _ = build_task(cfg, resolve_runtime(cfg))
    for s in task.students:
        path = run_dir / "checkpoints" / f"best-{s.name}.pt"
        if not path.is_file():
            raise UserError(f"calibrate: '{run_dir}' has no checkpoints/best-{s.name}.pt; the run is incomplete")
        state, _ = read_state_dict(path)
        unwrap(s.model).load_state_dict(state)
    return task


def calibrate_run(run_dir: Path, device: str | None = None, data_root_: str | None = None,
                  cache: str | None = None) -> dict[str, Any]:
    """Fit one temperature per model on val, score before/after on val and test, write ``calibration.json``.

    ``data_root_`` and ``cache`` replace the run's ``data_root`` and ``cache_dir`` (data or cache moved since)."""
    check_run(run_dir)
    task = _load(run_dir, device, data_root_, cache)
    members = [*task.students, *(task.teachers or ([task.teacher] if task.teacher is not None else []))]
    val, val_y = collect_logits(task, members, "val")
    if val_y.numel() == 0 or int(torch.unique(val_y).numel()) < 2:
        raise UserError(f"calibrate: the val split of '{run_dir}' holds a single class; fitting a temperature needs "
                        "at least 2: train the run with a larger val split (--val-fraction, or the val share of "
                        "--split-fractions)")
    has_test = len(task.loaders["test"].sampler.labels) > 0
    test, test_y = collect_logits(task, members, "test") if has_test else ({}, None)
    models: dict[str, Any] = {}
    for name, z in val.items():
        t = fit_temperature(z, val_y)
        entry: dict[str, Any] = {"temperature": t,
                                 "val": {"before": scores(z, val_y), "after": scores(scale(z, t), val_y)}}
        if test_y is not None:
            entry["test"] = {"before": scores(test[name], test_y), "after": scores(scale(test[name], t), test_y)}
        models[name] = entry
    result = {"run": str(run_dir), "method": "temperature scaling (Guo et al. 2017), T fitted on val by LBFGS on NLL",
              "n_bins": 15, "models": models}
    atomic_write_json(run_dir / "calibration.json", clean(result))
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: per model, T and test (else val) ECE/NLL/Brier before -> after."""
    rows = [f"{'model':<10} {'T':>7}  {'split':<5} {'ECE':>15} {'NLL':>15} {'Brier':>15}"]

    def pair(entry: dict[str, Any], key: str) -> str:
        a, b = entry["before"][key], entry["after"][key]
        return "n/a".rjust(15) if a is None or b is None or math.isnan(a) else f"{a:.4f} -> {b:.4f}".rjust(15)

    for name, entry in result["models"].items():
        split = "test" if "test" in entry else "val"
        cells = " ".join(pair(entry[split], k) for k in ("ece", "nll", "brier"))
        rows.append(f"{name:<10} {entry['temperature']:>7.4f}  {split:<5} {cells}")
    return "\n".join(rows)
