"""The Term contract: the objective owns the composition, the teaching stage and its companions (EMA copies are
no terms), and a training step calls it once (then once more after the optimizer step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distillistic.core.ema import EmaCopies
from distillistic.core.objective import Companion, Objective, Term
from distillistic.methods.pcl import TemporalMeanPeers


def test_ema_copies_are_a_companion_not_a_term() -> None:
    copies = EmaCopies(0.9)
    assert isinstance(copies, Companion)
    assert not isinstance(copies, Term)
    assert not hasattr(copies, "loss")


def test_the_objective_owns_the_companions_a_term_reads() -> None:
    """PCL's term reads its EMA copies; the objective binds, updates, evaluates and checkpoints them, once."""
    means = EmaCopies(0.5, warmup=True)
    term = TemporalMeanPeers(means, temperature=3.0, rampup=0.25)
    objective = Objective((term,), composition="sum")
    assert list(objective.companions) == [means]
    students = [nn.Linear(3, 2), nn.Linear(3, 2)]
    objective.bind(students, [(None, 1)] * 2)
    assert [(i, suffix) for i, suffix, _ in objective.members()] == [(0, "ema"), (1, "ema")]
    keys = set(objective.state_dict())
    assert {"companions.0.copies.0.weight", "companions.0.copies.1.weight"} <= keys
    assert not any(k.startswith("terms.") for k in keys)  # the copies are saved once, under the objective
    with torch.no_grad():
        students[0].weight.fill_(2.0)
    objective.after_step(None)  # type: ignore[arg-type]  # the first update copies the student (warm-up)
    assert torch.equal(means.copies[0].weight, students[0].weight)
    assert means.updates == 1


def test_a_companion_given_and_read_is_kept_once() -> None:
    means = EmaCopies(0.5)
    term = TemporalMeanPeers(means, temperature=1.0, rampup=0.0)
    objective = Objective((term,), composition="sum", companions=(means,))
    assert list(objective.companions) == [means]


class _Spy:
    """Stands in for the objective and records every attribute the loop reads from it."""

    def __init__(self, objective: Objective) -> None:
        self.objective, self.read = objective, []

    def __getattr__(self, name: str) -> Any:
        self.read.append(name)
        return getattr(self.objective, name)


@pytest.mark.parametrize("algo", ["kd", "dot"])  # dot: an optimizer that takes the distillation gradient apart
def test_a_step_calls_the_objective_once_and_its_teacher_runs_once(algo: str, tmp_path: Path) -> None:
    from distillistic import Config
    from distillistic.training import setup
    from distillistic.training.engine import TrainMeters, train_step
    from distillistic.training.run import build_task
    from distillistic.training.runtime import resolve_runtime

    cfg = setup.resolve(Config(algo=algo, dataset="synthetic", synthetic_samples=96, image_size=8, model="mlp",
                               teacher="mlp", teacher_weights="random", batch_size=32, teacher_store="off",
                               device="cpu", threads=1, out=str(tmp_path / "run")))
    rt = resolve_runtime(cfg)
    try:
        task, _ = build_task(cfg, rt)
        forwards: list[int] = []
        task.teacher.raw.register_forward_hook(lambda m, args, out: forwards.append(len(args[0])))
        meters = TrainMeters(task)
        assert task.term_parameters == []  # the terms' own parameters, read once before the first step
        assert len(task.student_terms) == 1
        spy = _Spy(task.objective)
        task.objective = spy  # type: ignore[assignment]
        batch = next(iter(task.views.prepare(task.loaders["train"].epoch(0))))
        train_step(task, batch, 0.5, meters)
        assert spy.read == ["step", "after_step"]
        assert forwards == [len(batch.labels)]  # the teaching stage: one forward of the teacher per step
    finally:
        rt.close()
