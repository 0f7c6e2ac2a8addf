"""Transformed teacher matching (Zheng & Yang 2024, ICLR, "Knowledge Distillation Based on Transformed Teacher
Matching"): the student, at T = 1, matches the teacher's power-transformed distribution.

``L = CE(z, y) + β·mean_b KL(q̃_b ‖ softmax(z_b))`` with ``q̃ = q^γ / Σ_k q_k^γ``, ``q = softmax(t)``: KD with the
temperature ``T = 1/γ`` on the teacher's side only (``q̃ = softmax(γ·t)``), which adds a Rényi-entropy
regulariser to KD (the paper's section 3). WTTM (:mod:`distillistic.methods.wttm`) weighs each sample by
``U_γ(q) = Σ_k q_k^γ``. Reference: zkxufo/TTM, ``distiller_zoo/ttm.py`` and ``distiller_zoo/wttm.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import Interval, MethodSpec, Param, Setting, at_least, log_uniform

_README = "zkxufo/TTM @fe457b3, README.md lines 19-23 (vgg13 -> vgg8: --distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0)"
SPEC = MethodSpec(
    "ttm", "Zheng & Yang 2024, Knowledge Distillation Based on Transformed Teacher Matching (ICLR): TTM",
    "L = CE(z, y) + β KL(softmax(t)^γ / Σ_k softmax(t)_k^γ ‖ softmax(z)); the teacher at T = 1/γ, the student at 1",
    family="teacher", needs_teacher=True, default_teacher="resnet50", composition="sum", weights=("ttm_beta",),
    notes="the paper's appendix A.4 lists T = 1/γ and β per teacher-student pair; the defaults are the one "
          "setting the authors' README gives (vgg13 -> vgg8)",
    defaults=(
        Setting("ttm_gamma", "appendix A.4: T = 1/γ per teacher-student pair (not transcribed here)",
                f"{_README}: --ttm_l 0.1", "the code's README example"),
        Setting("ttm_beta", "appendix A.4: β per pair (not transcribed here)", f"{_README}: -b 45",
                "the code's README example"),
    ),
    params=(
        Param("ttm_gamma", float, 0.1, "exponent gamma of the teacher's power transform (the teacher's T = 1/gamma)",
              cite=f"{_README}: --ttm_l 0.1", range=Interval(0.0, 1.0, open_low=True),
              allowed="an exponent in (0, 1] (1: the teacher as it is)", space=log_uniform(0.05, 1.0)),
        Param("ttm_beta", float, 45.0, "weight beta of the TTM term", cite=f"{_README}: -b 45",
              range=at_least(0.0), allowed="a weight >= 0", space=log_uniform(1.0, 100.0)),
    ))


def power_transform(t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(log q̃, U)`` for teacher logits ``t`` ``[B, K]``: ``q̃ = q^γ / U``, ``U = Σ_k q_k^γ``, ``q = softmax(t)``.

    In log space (``log q̃ = log_softmax(γ·t)``, ``log U = logsumexp(γ·log_softmax(t))``): no ``q^γ`` of an
    underflowed probability. ``log q̃`` ``[B, K]``, ``U`` ``[B]``; float32 (float64 stays float64).
    """
    scaled = gamma * F.log_softmax(at_least_float32(t), dim=1)
    log_u = torch.logsumexp(scaled, dim=1)
    return scaled - log_u.unsqueeze(1), log_u.exp()


def ttm_loss(z: Tensor, t: Tensor, gamma: float = 0.1, weighted: bool = False) -> Tensor:
    """``mean_b w_b·KL(q̃_b ‖ softmax(z_b))`` (TTM: ``w = 1``; WTTM, ``weighted``: ``w = U_γ(q_b)``), a scalar.

    ``z``, ``t``: student and teacher logits ``[B, K]`` (the teacher detached). As the reference's ``TTM`` and
    ``WTTM`` modules; a class with ``q̃ = 0`` contributes 0 (``kl_div``'s convention).
    """
    log_q, u = power_transform(t.detach(), gamma)
    log_p = F.log_softmax(at_least_float32(z), dim=1)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=1)
    return (u * kl).mean() if weighted else kl.mean()


class TTMTerm(TeacherLogitTerm):
    """``mean_b w_b·KL(q̃_b ‖ softmax(z_b))``, ``q̃ = softmax(γ·t)``, ``w`` 1 or ``U_γ`` (:func:`ttm_loss`)."""

    def __init__(self, name: str, teacher: LogitSource, gamma: float, beta: float, weighted: bool) -> None:
        super().__init__(name, teacher, 1.0 / gamma, False)
        self.gamma, self.weighted, self.weight = gamma, weighted, beta

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return ttm_loss(zs, ts, self.gamma, self.weighted)

    def describe(self) -> str:
        g = f"{self.gamma:g}"
        weight = f"U_{g}(softmax(t))·" if self.weighted else ""
        return f"{weight}KL(softmax(t)^{g}/U_{g} ‖ softmax(z))"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return (TTMTerm("ttm", logit_source(ctx.teacher, "ttm"), cfg.ttm_gamma, cfg.ttm_beta, weighted=False),)


register_method(SPEC, terms)
