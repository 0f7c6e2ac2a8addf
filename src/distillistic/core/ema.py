"""EMA copies of the students (``--ema DECAY``) and PCL's temporal mean teachers (``pcl``).

* :class:`EmaCopies` keeps ``θ'_i ← d·θ'_i + (1 − d)·θ_i`` for every student ``i`` after every optimizer step
  (:func:`~distillistic.core.logit_losses.ema_update_`, buffers copied from the student so that the copy runs
  in ``eval()`` mode with statistics of the right scale). It teaches nothing: with ``--ema`` it is a companion
  of the objective, and its copies are evaluated beside the students (``student_ema``, ``student0_ema`` ...),
  selected on val, reported and exported like them. The copies are submodules, so they are in the
  objective's state dict and a resume restores them exactly.
* :class:`TemporalMeanPeers` (Wu & Gong 2021, Peer Collaborative Learning for Online KD, AAAI: the temporal
  mean teachers, their decay warmed up as mean teacher's ``min(1 − 1/(n + 1), d)``): student ``i`` learns
  from the mean of the *other* students' EMA predictions, ``q_i = mean_(j≠i) softmax(z'_j / T)`` with
  ``z'_j`` the logits of student ``j``'s EMA copy on student ``j``'s view of the batch (its own augmented view
  with ``--peer-views independent``, as PCL's peers read differently augmented inputs; under ``no_grad``,
  ``eval()`` mode); the consistency weight ramps up as mean teacher's
  ``exp(−5 (1 − p/p_r)²)`` over the first share ``p_r`` of training::

      L_i = CE(z_i, y) + r(p) · T² · KL(mean_(j≠i) softmax(z'_j / T) ‖ softmax(z_i / T))

  Only the temporal-mean part of PCL is implemented (no multi-branch peer ensemble teacher).

This module imports nothing of :mod:`distillistic.core.methods`; that module calls :func:`register`
(so the registry has no import cycle).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.divergences import DIVERGENCES, SYMBOLS
from distillistic.core.logit_losses import ema_update_, mean_teacher_decay, peer_mean_target, sigmoid_rampup
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs, model_view
from distillistic.errors import UserError

PCL_REFERENCE = ("Wu & Gong 2021, Peer Collaborative Learning for Online Knowledge Distillation (AAAI): "
                 "temporal mean teachers")


class EmaCopies(Term):
    """An EMA copy of every student, updated after every optimizer step with decay ``d``.

    ``suffix`` names the copies as evaluated members: ``<student>_<suffix>``. With ``warmup`` the decay at
    update ``n`` (0-based) is mean teacher's ``min(1 − 1/(n + 1), d)`` (:func:`mean_teacher_decay`, as the
    PCL re-implementation): early on the copy is the true mean of the weights so far. Without it, ``d``.
    """

    def __init__(self, decay: float, suffix: str = "ema", name: str = "ema", warmup: bool = False) -> None:
        super().__init__(name, weight=0.0, distil=False)
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
        """Every copy's logits ``[M, B, K]`` (float32) on its student's view of the batch, in ``eval()`` mode."""
        out = []
        for i, (twin, (size, channels, *norm)) in enumerate(zip(self.copies, self._views)):
            if twin.training:  # a stray .train() must not switch BatchNorm/dropout on
                twin.eval()
            out.append(twin(model_view(inp.view_of(i), size, channels, norm[0] if norm else None)).float())
        return torch.stack(out)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        raise RuntimeError("EMA copies teach nothing: they are a companion of the objective, not a term")

    def describe(self) -> str:
        return f"θ' ← {self.decay:g}·θ' + {1 - self.decay:.3g}·θ"


class TemporalMeanPeers(Term):
    """PCL's peer mean teacher: ``r(p)·T²·D(mean_(j≠i) softmax(z'_j/T) ‖ softmax(z_i/T))`` (module docstring)."""

    def __init__(self, decay: float, temperature: float, rampup: float, divergence: str = "kl",
                 name: str = "pcl") -> None:
        super().__init__(name, weight=1.0, distil=True, ramp=lambda progress: sigmoid_rampup(progress, rampup))
        self.temperature, self.rampup, self.divergence = temperature, rampup, divergence
        self.means = EmaCopies(decay, suffix="ema", name=f"{name}_mean", warmup=True)
        self._fn = DIVERGENCES.get(divergence)

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        self.means.bind(students, views)

    def after_step(self, inp: StepInputs) -> None:
        self.means.after_step(inp)

    def members(self) -> list[tuple[int, str, nn.Module]]:
        return self.means.members()

    def targets(self, inp: StepInputs) -> list[Tensor]:
        """``q_i = mean_(j≠i) softmax(z'_j / T)``, one ``[1, B, K]`` per student (detached)."""
        q = peer_mean_target(self.means.logits(inp), self.temperature)
        return [q[i : i + 1] for i in range(q.shape[0])]

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        assert target is not None
        return self._fn(target, z, self.temperature)

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        d = SYMBOLS.get(self.divergence, self.divergence.upper())
        scale, peer, me = (f"{t}²·", f"softmax(z'_j/{t})", f"softmax(z/{t})") if self.temperature != 1 else (
            "", "softmax(z'_j)", "softmax(z)")
        return (f"r(p)·{scale}{d}(mean_(j≠i) {peer} ‖ {me}), z'_j = EMA({self.means.decay:g}) of student j, "
                f"r ramping up over {self.rampup:.0%} of training")


class _Context(Protocol):
    num_classes: int
    students: int


def _pcl(cfg: Config, ctx: _Context) -> tuple[Term, ...]:
    """L_i = CE(z_i, y) + r(p) T² KL(mean_(j≠i) softmax(z'_j/T) ‖ softmax(z_i/T)), z'_j = EMA of student j"""
    if cfg.ema is not None:
        raise UserError(f"--ema {cfg.ema:g} with algo pcl: pcl keeps an EMA copy of every student already "
                        "(its decay is --pcl-decay); drop --ema")
    assert cfg.temperature is not None, "resolve the config first"
    return (TemporalMeanPeers(cfg.pcl_decay, cfg.temperature, cfg.pcl_rampup, cfg.divergence),)


def register(method: Callable[..., Callable[[Any], Any]]) -> None:
    """Register this module's methods with :func:`distillistic.core.methods.method`."""
    method("pcl", PCL_REFERENCE, family="cohort", params=("pcl_decay", "pcl_rampup"), min_students=2,
           default_students=2, default_temperature=lambda cfg: 3.0, composition="sum", weights=("pcl_rampup",))(_pcl)
