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


def test_logit_standardisation_is_one_transform_handed_to_the_signal() -> None:
    """Every term standardises through logit_transform: the signal gets it with the temperature, the student's
    logits go through the same function; a signal not made of logits is refused."""
    from distillistic.core.logits import logit_transform, standardize
    from distillistic.core.objective import Distill
    from distillistic.core.signals import StepInputs
    from distillistic.methods.dml import Peers
    from distillistic.methods.tfkd import Virtual

    assert logit_transform(True) is standardize
    assert logit_transform(False) is None
    seen: list[Any] = []

    class Recording(Peers):
        def targets(self, inp: StepInputs, temperature: float, transform: Any = None) -> list[torch.Tensor]:
            seen.append((temperature, transform))
            return super().targets(inp, temperature, transform)

    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 5, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    inp = StepInputs(None, torch.zeros(4, dtype=torch.long), z, 5)  # type: ignore[arg-type]
    term = Distill("dml", Recording("pairwise", name="dml"), temperature=2.0, standardize=True)
    q = term.targets(inp)
    assert seen == [(2.0, standardize)]
    want = torch.softmax(((z[1] - z[1].mean(1, keepdim=True)) / (1e-7 + z[1].std(1, keepdim=True))) / 2.0, dim=1)
    torch.testing.assert_close(q[0][0], want, rtol=0, atol=1e-12)  # student 0 learns from its z-scored peer
    with pytest.raises(ValueError, match="not made of logits"):
        Distill("tfkd", Virtual(0.9, smooth=True), standardize=True)
    with pytest.raises(ValueError, match="cannot be standardised"):
        Virtual(0.9, smooth=True).targets(inp, 1.0, standardize)
