"""The Term contract: the objective owns the composition and its companions (EMA copies are no terms)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillistic.core.ema import EmaCopies
from distillistic.core.objective import Companion, Objective, Term
from distillistic.methods.pcl import TemporalMeanPeers

pytestmark = pytest.mark.unit


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
