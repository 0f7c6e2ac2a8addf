"""Born-again networks (Furlanello et al. 2018, ICML): generations of one architecture, each taught by the last.

``ban --generations k`` trains ``k`` runs of the student architecture one after the other:

* generation 1 is trained as the baseline, ``L = CE(z, y)``;
* generation ``g > 1`` is knowledge distillation from generation ``g − 1``'s best-on-val weights (a frozen
  teacher of the same architecture, read from that generation's run directory)::

      L = (1 − a)·CE(z, y) + a·T²·KL(softmax(t_(g−1)/T) ‖ softmax(z/T))

The paper's students learn from the teacher's soft labels at ``T = 1`` (the default here). Generation ``g``
starts from its own initialisation (model seed ``seed + g − 1``) on the same data order (``data_seed``).
The training loop (:mod:`distillistic.training.generations`) writes each generation as a run directory
``<out>/gen<g>`` and evaluates every generation and their ensemble (probability average) on test.

This module imports nothing of :mod:`distillistic.core.methods`; that module calls :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from distillistic.config import FIELDS, Config
from distillistic.core.objective import Distill, Term
from distillistic.core.signals import Signal
from distillistic.errors import ConfigError

BAN_REFERENCE = "Furlanello et al. 2018, Born-Again Neural Networks (ICML)"


class _Context(Protocol):
    teacher: Signal | None


def generation_config(cfg: Config, g: int, previous: str | None) -> Config:
    """The config of generation ``g`` (1-based) of a resolved ``ban`` config, taught by run dir ``previous``.

    Generation 1 is a ``baseline`` run; generation ``g > 1`` a ``kd`` run whose teacher is the student
    architecture with ``previous``'s best weights, reading the students' view (same input size).
    """
    students = len(cfg.students) if isinstance(cfg.students, tuple) else cfg.students
    if students not in (None, 1):
        raise ConfigError("students", cfg.students, "1 for ban (each generation is one student, taught by the "
                                                    "last); drop --students")
    common = dict(generations=FIELDS["generations"].default, seed=cfg.seed + g - 1, data_seed=cfg.data_seed,
                  teacher_epochs=None)
    if g == 1 or previous is None:
        return cfg.replace(algo="baseline", teacher=None, **common)
    return cfg.replace(algo="kd", teacher=cfg.model, teacher_weights=previous,
                       teacher_resolution=cfg.student_resolution, **common)


def _ban(cfg: Config, ctx: _Context) -> tuple[Term, ...]:
    """generation 1: L = CE(z, y); generation g: L = (1-a) CE(z, y) + a T² KL(softmax(t_(g-1)/T) ‖ softmax(z/T))"""
    if ctx.teacher is None:  # generation 1, or the objective printed without a teacher
        return ()
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("ban", ctx.teacher, cfg.divergence, cfg.temperature),)


def register(method: Callable[..., Callable[[Any], Any]]) -> None:
    """Register this module's methods with :func:`distillistic.core.methods.method`."""
    method("ban", BAN_REFERENCE, family="self", params=("generations",), default_temperature=lambda cfg: 1.0,
           generations=lambda cfg: cfg.generations, generation=generation_config)(_ban)
