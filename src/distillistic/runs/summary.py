"""``summary.json``: what a run's models scored, built from the engine's progress and final evaluation.

For every model (``student`` or ``student0``…, ``ensemble`` and ``teacher`` — ``teacher0``, ``teacher1``…
when several — where they exist; students and teachers also record their ``arch``)::

    test       test metrics at the model's best-on-val epoch (the selected model)
    test_last  test metrics at the last epoch
    val_best   validation metrics at the best-on-val epoch, with that ``epoch``
    val_last   validation metrics at the last epoch

A cohort adds ``best_student`` (by val top-1) and ``cohort_mean`` (the students' mean of each part).
Accuracies are fractions in [0, 1]; NaN and inf are written as null.

Costs (:mod:`distillistic.training.costs`), in ``costs`` beside ``models`` (timings differ between two
runs that train identically): every student and teacher has a ``cost`` (``params``, ``flops``
and ``macs`` per image at its ``input`` shape; a completed run's students also ``latency_ms`` median and
p90 at batch 1, ``throughput_images_per_second``, ``threads``, ``device``); ``train_flops`` and
``train_seconds`` are the method's training cost, with the step's breakdown in ``train_cost``; a teacher
trained for the run has its own ``training_cost`` (its run's FLOPs and seconds, and how many runs shared it).
"""

from __future__ import annotations

import math
from typing import Any

from distillistic import config as config_mod
from distillistic.training.engine import Progress, Task

METRICS = ("top1", "top5", "ece", "nll", "brier", "entropy")
# calibration beyond ECE and, for students with a teacher, agreement with it (core/heldout.py)
CALIBRATION = ("ace", "mce", "classwise_ece", "teacher_agreement", "teacher_kl")


def clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _metrics(m: dict[str, Any] | None, epoch: bool = False) -> dict[str, Any] | None:
    if m is None:
        return None
    keep = [*METRICS, "n", "per_class_top1", "reliability", *CALIBRATION, *(["epoch"] if epoch else [])]
    return {k: m[k] for k in keep if k in m}


def _mean(entries: list[dict[str, Any] | None]) -> dict[str, float] | None:
    present = [e for e in entries if e]
    if not present:
        return None
    return {k: sum(e[k] for e in present) / len(present) for k in METRICS if all(k in e for e in present)}


def build_summary(task: Task, progress: Progress, status: str, reason: str | None = None,
                  final: dict[str, dict[str, Any]] | None = None,
                  teacher_source: str | list[str] | None = None,
                  costs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The summary of a run that ended with ``status`` (completed, interrupted, diverged); ``costs``: a
    ``cost`` (and for a teacher a ``training_cost``) per model name."""
    cfg, final = task.cfg, final or {}
    last_val = {r["model"]: r for r in progress.history if r["split"] == "val"}
    models: dict[str, Any] = {}
    archs = config_mod.student_archs(cfg, len(task.students))
    archs += [archs[[s.name for s in task.students].index(m.follows or "")] for m in task.members]
    for s, arch in zip([*task.students, *task.members], archs):  # members: EMA copies (student_ema ...)
        mine = final.get(s.name, {})
        models[s.name] = {"test": _metrics(mine.get("test")), "test_last": _metrics(mine.get("test_last")),
                          "val_best": _metrics(progress.best.get(s.name), epoch=True),
                          "val_last": _metrics(last_val.get(s.name)), "arch": arch}
    summary: dict[str, Any] = {"status": status, "reason": reason, "algo": cfg.algo, "dataset": cfg.dataset,
                               "objective": str(task.objective)}
    if len(task.students) > 1:
        ens = final.get("ensemble", {})
        models["ensemble"] = {"test": _metrics(ens.get("test")), "test_last": _metrics(ens.get("test_last")),
                              "val_best": _metrics(ens.get("val_best"), epoch=True),
                              "val_last": _metrics(last_val.get("ensemble"))}
        scored = [(models[s.name]["val_best"] or {}).get("top1", -1.0) for s in task.students]
        summary["best_student"] = task.students[scored.index(max(scored))].name
        summary["cohort_mean"] = {part: _mean([models[s.name][part] for s in task.students])
                                  for part in ("test", "test_last", "val_best", "val_last")}
    teachers = cfg.teacher or ()  # one row each: teacher, or teacher0, teacher1…
    sources = teacher_source if isinstance(teacher_source, list) else [teacher_source] * len(teachers)
    for name, arch, source in zip(config_mod.teacher_names(len(teachers)), teachers, sources):
        if name in final:
            models[name] = {"test": _metrics(final[name].get("test")),
                            "val_best": _metrics(final[name].get("val_best"), epoch=True),
                            "source": source, "arch": arch}
            if name in task.teacher_temperatures:  # the teaching signal is t / T_cal (--teacher-calibration)
                models[name] |= {"calibration": cfg.teacher_calibration,
                                 "calibration_temperature": task.teacher_temperatures[name]}
    summary["models"] = models
    if costs:
        summary["costs"] = costs
    summary |= {"epochs_completed": progress.epoch, "train_seconds": progress.train_seconds,
                "train_images_per_second": progress.train_images / max(progress.train_seconds, 1e-9)}
    summary |= train_cost(task, progress)
    return dict(clean(summary))


def train_cost(task: Task, progress: Progress) -> dict[str, Any]:
    """``train_flops`` (the method's training FLOPs so far) and ``train_cost`` (how they add up), if counted."""
    c = task.costs
    if c is None:
        return {}
    return {"train_flops": c.total(progress), "train_cost": {
        "flops": c.total(progress), "steps": progress.global_step, "world_size": c.world_size,
        "step_flops": c.step_flops, "teacher_step_flops": c.teacher_step_flops,
        "students_step_flops": c.own_step_flops, "teacher_forward_flops": progress.teacher_flops,
        "seconds": progress.train_seconds, **c.peak, "counted_by": "torch.utils.flop_counter.FlopCounterMode "
        "(matrix products and convolutions, forward and backward; one step at mid-training, times the steps)"}}
