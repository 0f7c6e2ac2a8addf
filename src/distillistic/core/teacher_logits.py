"""Terms computed from a frozen teacher's raw logits (the methods whose loss is not a divergence to a target)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from distillistic.core.logits import logit_transform
from distillistic.core.objective import Ramp, Term, constant
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import Signal, StepInputs
from distillistic.errors import UserError


class LogitSource(Protocol):
    """A teacher signal whose raw logits ``[B, K]`` can be read (:class:`~distillistic.core.signals.Teacher`)."""

    def logits(self, inp: StepInputs) -> Tensor: ...


def logit_source(signal: Signal | None, algo: str) -> LogitSource:
    """``signal`` as a source of raw teacher logits, or one line saying the method needs one frozen teacher."""
    if signal is None or not callable(getattr(signal, "logits", None)):
        raise UserError(f"algo {algo} needs one frozen teacher whose logits can be read (not several teachers); "
                        "give one --teacher")
    return signal  # type: ignore[return-value]


class TeacherLogitTerm(Term):
    """A term computed from the frozen teacher's raw logits ``t`` ``[B, K]`` and the student's ``z`` ``[B, K]``.

    Its monitored target (entropy, ECE in the training rows) is ``softmax(t/T)`` (z-scored ``t`` if standardised).
    """

    def __init__(self, name: str, teacher: LogitSource, temperature: float, standardize: bool,
                 ramp: Ramp = constant) -> None:
        super().__init__(name, 1.0, distil=True, ramp=ramp)
        self.teacher, self.temperature, self.standardize = teacher, temperature, standardize
        self.transform = logit_transform(standardize)  # logit standardisation's one switch

    def pair(self, z: Tensor, inp: StepInputs) -> tuple[Tensor, Tensor]:
        """``(z, t)``, both z-scored per sample when standardising."""
        t = self.teacher.logits(inp)
        return (self.transform(z), self.transform(t)) if self.transform else (z, t)

    def teacher_logits(self, inp: StepInputs) -> Tensor:
        """The teacher's logits its monitored target softens: z-scored when standardising, else float32 at least."""
        t = self.teacher.logits(inp)
        return self.transform(t) if self.transform else at_least_float32(t)

    def targets(self, inp: StepInputs) -> list[Tensor]:
        q = torch.softmax(self.teacher_logits(inp) / self.temperature, dim=-1)
        return [q.unsqueeze(0)] * len(inp.logits)

    def _suffix(self) -> str:
        return " on z-scored logits" if self.standardize else ""
