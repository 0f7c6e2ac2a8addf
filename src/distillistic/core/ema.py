"""EMA copies of the students (``--ema DECAY``): ``θ'_i ← d·θ'_i + (1 − d)·θ_i`` after every optimizer step.

A copy teaches nothing: it is a :class:`~distillistic.core.objective.Companion` of the objective (not one of its
terms), evaluated beside the student it follows (``student_ema``, ``student0_ema`` …), selected on val, reported
and exported like it. Buffers are copied from the student, so a copy that only ever runs in ``eval()`` mode has
statistics of the right scale. The objective owns the copies, so they are in its state dict and a resume restores
them exactly. PCL's temporal mean teachers (:mod:`distillistic.methods.pcl`) are such copies, which its term is
given and reads through :meth:`EmaCopies.logits`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distillistic.core.objective import Companion
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, model_view


def mean_teacher_decay(step: int, decay: float) -> float:
    """``min(1 − 1/(step + 1), decay)``: mean teacher's (and PCL re-implementation's) EMA decay schedule.

    Early on the EMA is then the true average of the weights seen so far (step 0 copies the model).
    """
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float, copy_buffers: bool = True) -> None:
    """In place: ``θ' ← d·θ' + (1 − d)·θ`` for every parameter (PCL's temporal mean, Wu & Gong 2021, d = 0.999).

    Call after the optimizer step. With ``copy_buffers`` the buffers (BatchNorm running statistics,
    ``num_batches_tracked``) are copied from ``model``, so an EMA copy that is only ever run in ``eval()`` mode
    has statistics of the right scale. Mean teacher's ``update_ema_variables`` and the PCL re-implementation
    average the parameters only and leave the buffers to the EMA model's own forward passes in ``train()`` mode
    (their EMA models run in train mode every step): pass ``copy_buffers=False`` to reproduce that.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        raise ValueError("ema and model have different parameters")
    names = list(model_params)
    targets: list[Tensor] = [ema_params[n] for n in names]
    sources = [model_params[n].detach() for n in names]
    if targets:
        # lerp: θ' + (1 − d)(θ − θ') = d·θ' + (1 − d)·θ, one fused kernel per device and dtype
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
    if copy_buffers:
        model_buffers = dict(model.named_buffers())
        for name, buffer in ema.named_buffers():
            buffer.copy_(model_buffers[name])


class EmaCopies(Companion):
    """An EMA copy of every student, updated after every optimizer step with decay ``d``.

    ``suffix`` names the copies as evaluated members: ``<student>_<suffix>``. With ``warmup`` the decay at
    update ``n`` (0-based) is mean teacher's ``min(1 − 1/(n + 1), d)`` (:func:`mean_teacher_decay`, as the
    PCL re-implementation): early on the copy is the true mean of the weights so far. Without it, ``d``.
    """

    def __init__(self, decay: float, suffix: str = "ema", warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.suffix, self.warmup = decay, suffix, warmup
        self.updates = 0  # a host int (no device sync to read it); saved through the extra state
        self.copies = nn.ModuleList()
        self._students: list[nn.Module] = []  # a plain list: the students are not submodules of the objective
        self._views: list[tuple[Any, ...]] = []  # (size, channels[, norm]) per student

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        """Start every copy as the student it follows (a resume then loads the saved copies over it)."""
        self._students, self._views = list(students), list(views)
        if len(self.copies) == 0:
            for student in students:
                twin = copy.deepcopy(student)
                for module in twin.modules():  # a tap's hooks on the student must not fire for its copy
                    module._forward_hooks.clear()
                    module._forward_pre_hooks.clear()
                self.copies.append(twin.requires_grad_(False).eval())

    def after_step(self, inp: StepInputs) -> None:
        decay = mean_teacher_decay(self.updates, self.decay) if self.warmup else self.decay
        for twin, student in zip(self.copies, self._students):
            ema_update_(twin, student, decay)
        self.updates += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.updates = int(state["updates"])

    def members(self) -> list[tuple[int, str, nn.Module]]:
        return [(i, self.suffix, twin) for i, twin in enumerate(self.copies)]

    @torch.no_grad()
    def logits(self, inp: StepInputs) -> Tensor:
        """Every copy's logits ``[M, B, K]`` (float32; float64 in an fp64 run) on its student's view of the
        batch, in ``eval()`` mode."""
        out = []
        for i, (twin, (size, channels, *norm)) in enumerate(zip(self.copies, self._views)):
            if twin.training:  # a stray .train() must not switch BatchNorm/dropout on
                twin.eval()
            view = model_view(inp.view_of(i), size, channels, norm[0] if norm else None)
            out.append(at_least_float32(twin(view)))
        return torch.stack(out)

    def describe(self) -> str:
        return f"θ' ← {self.decay:g}·θ' + {1 - self.decay:.3g}·θ"
