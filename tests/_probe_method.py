"""A test-only method (``probe``) whose term owns a trainable parameter per student and an EMA state.

Imported only in subprocesses (``python tests/_probe_method.py train ...``, also under torchrun), so the
registry of the test process itself keeps the project's methods only. The term

    probe_i = KL(v ‖ softmax(z_i · e^{s_i})) + (s_i − m_i)²,     m_i ← d·m_i + (1 − d)·s_i after each step

has a trainable scale ``s_i`` per student (it joins student i's optimizer, DDP's gradient average and the
checkpoint) and an EMA ``m`` (a buffer, updated after the optimizer step and checkpointed): both change
the training trajectory, so an exact resume needs both restored.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.methods.registry import METHODS, Context, register_method
from distillistic.methods.spec import MethodSpec
from distillistic.methods.tfkd import Virtual


class ProbeTerm(Term):
    def __init__(self, students: int, decay: float = 0.9) -> None:
        super().__init__("probe")
        self.scale = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(students)])
        self.register_buffer("ema", torch.zeros(students))
        self.decay, self.virtual = decay, Virtual(0.9, smooth=False)

    def targets(self, inp: StepInputs) -> list[Tensor]:
        return self.virtual.targets(inp, 1.0)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        assert target is not None
        s = self.scale[i]
        logp = torch.log_softmax(z.float() * s.exp(), dim=-1)
        kl = (torch.xlogy(target, target) - target * logp).sum(dim=-1).mean()
        return kl + (s - self.ema[i]) ** 2

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        yield self.scale[i]

    @torch.no_grad()
    def after_step(self, inp: StepInputs) -> None:
        ema: Tensor = self.ema  # type: ignore[assignment]
        ema.mul_(self.decay).add_(torch.stack(list(self.scale)), alpha=1 - self.decay)

    def describe(self) -> str:
        return "[KL(v ‖ softmax(z·e^s)) + (s − m)²]"


SPEC = MethodSpec("probe", "test-only: a term with a trainable parameter and an EMA state",
                  "L = (1-a) CE + a [KL(v ‖ softmax(z e^s)) + (s - m)²], m an EMA of s", family="self")


def _probe(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return (ProbeTerm(ctx.students),)


if "probe" not in METHODS:
    register_method(SPEC, _probe)


if __name__ == "__main__":
    from distillistic.cli import main

    sys.exit(main(sys.argv[1:]))
