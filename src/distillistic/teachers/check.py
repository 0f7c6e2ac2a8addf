"""A teacher checked before it teaches: its val accuracy against chance, and the data it was recorded for.

Distilling from a teacher that learned nothing (a training run that failed, the wrong checkpoint)
silently drags every student towards the uniform distribution, and a teacher trained on other data,
classes or input size teaches the wrong thing. Before the first step, the teacher's val top-1 is
measured (read from the teacher-output store when it is warm) and printed; a trained or loaded
teacher whose top-1 is within three binomial standard deviations of chance (the largest class share
of the val split), or whose checkpoint records another dataset, class count or input size, is
refused with one line. ``--teacher-weights random`` (asked for explicitly) and
``--allow-weak-teacher`` proceed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from distillistic.errors import CheckpointError, UserError
from distillistic.teachers.roster import TeacherSet
from distillistic.training.checkpoint import read_state_dict
from distillistic.training.engine import Task, evaluate
from distillistic.training.lines import say


def chance_threshold(labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """``(chance, threshold)``: the largest class share ``p`` of ``labels`` ``[N]`` and ``p + 3 sqrt(p(1-p)/N)``,
    the top-1 a teacher must pass to be told apart from guessing (a one-sided binomial test, z = 3)."""
    n = max(int(labels.numel()), 1)
    counts = torch.bincount(labels.long(), minlength=num_classes).double()
    p = float(counts.max() / n) if labels.numel() else 1.0 / num_classes
    return p, p + 3.0 * math.sqrt(p * (1.0 - p) / n)


def recorded_mismatch(source: str, cfg_dataset: str, num_classes: int, input_size: int) -> str | None:
    """What a teacher checkpoint records that differs from this run (dataset, classes, input size), or None."""
    try:
        _, meta = read_state_dict(Path(source).expanduser())
    except (CheckpointError, UserError, OSError):
        return None  # already loaded once by build_teacher: unreadable metadata only
    rec: dict[str, Any] = meta.get("config") or {}
    if rec.get("dataset") not in (None, cfg_dataset):
        return f"it was trained on '{rec['dataset']}', this run uses '{cfg_dataset}'"
    if meta.get("num_classes") not in (None, num_classes):
        return f"it was trained for {meta['num_classes']} classes, this run has {num_classes}"
    size = rec.get("student_resolution") or rec.get("image_size")
    if size not in (None, input_size):
        return f"it was trained on {size} px inputs, it reads {input_size} px here"
    return None


def check_teacher(task: Task, teachers: TeacherSet | None) -> dict[str, dict[str, Any]] | None:
    """Measure every teacher on val, print it, and refuse one (``UserError``) at chance level or recorded for
    other data, unless its weights are random by request or ``allow_weak_teacher`` is set."""
    if teachers is None:
        return None
    cfg = task.cfg
    val = evaluate(task, teachers.members, "val")
    chance, threshold = chance_threshold(task.loaders["val"].sampler.labels, task.num_classes)
    for c, member, source in zip(teachers.configs, teachers.members, teachers.sources):
        (weights,) = c.teacher_weights
        kind = weights if weights in ("train", "random", "imagenet") else "from a file"
        arch = c.teacher_arch if len(teachers.members) == 1 else f"{member.name} ({c.teacher_arch})"
        if kind == "from a file" and not cfg.allow_weak_teacher:
            why = recorded_mismatch(source, cfg.dataset, task.num_classes, c.teacher_resolution or cfg.image_size or 0)
            if why:
                raise UserError(f"teacher '{source}' does not match this run: {why}; train it on this data "
                                "(--teacher-weights train) or pass --allow-weak-teacher")
        metrics = val[member.name]
        say("teacher %s (%s): val top1 %.4f, ece %.4f (chance %.4f)", arch, kind, metrics["top1"], metrics["ece"],
            chance)
        if metrics["top1"] <= threshold and weights != "random" and not cfg.allow_weak_teacher:
            raise UserError(f"the teacher {arch} ({source}) is at chance level on val (top1 {metrics['top1']:.4f}, "
                            f"chance {chance:.4f}): it would teach noise; {weak_teacher_advice(kind, c)}, or pass "
                            "--allow-weak-teacher")
    return val


def weak_teacher_advice(kind: str, teacher: Any) -> str:
    """What to do about a weak teacher, by how it was obtained (trained first, ImageNet weights, a file)."""
    if kind == "train":
        epochs = getattr(teacher, "teacher_epochs", None) or getattr(teacher, "epochs", None)
        return (f"train it longer (--teacher-epochs, now {epochs}) or with more optimizer steps "
                "per epoch (a smaller --batch-size on small data)")
    if kind == "imagenet":
        return ("ImageNet weights do not know these classes: fine-tune it first (--teacher-weights train "
                "--teacher-init imagenet)")
    return ("it was loaded from a file: train the run it came from longer, or choose a better checkpoint with "
            "--teacher-weights")
