"""Curriculum temperature for KD (Li et al. 2023, AAAI), its global variant: a temperature learned adversarially.

``L = (1 − α)·CE(z, y) + α·T²·KL(softmax(t/T) ‖ softmax(z/T))``, α = 0.9 (the authors'), with ``T = 1 + 20·sigmoid(θ)``;
θ follows the reversed gradient, scaled by a cosine curriculum λ rising from 0 to 1 over the first share of
training, counted in whole epochs from 1 as the reference's ``CosineDecay.get_value(epoch)``.
Reference: zhengli97/CTKD, ``models/temp_global.py`` and ``train_student.py`` (``CosineDecay``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.logits import kl_batchmean
from distillistic.core.objective import Term, epoch_progress
from distillistic.core.precision import at_least_float32, loss_dtype
from distillistic.core.signals import StepInputs
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Param, Setting, share, uniform

SPEC = MethodSpec(
    "ctkd", "Li et al. 2023, Curriculum Temperature for Knowledge Distillation (AAAI): global temperature",
    "L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)), T = 1 + 20 sigmoid(θ), θ by reversed gradient",
    family="teacher", needs_teacher=True, default_teacher="resnet50",
    defaults=(
        Setting("alpha", "—",
                "zhengli97/CTKD@7d52522, train_student.py:79-80 (-r 0.1, -a 0.9), scripts/run_cifar_distill.sh",
                ours="0.9 (0.1·CE + 0.9·KD)"),
        Setting("ctkd_ramp", "Li et al. 2023: λ by a cosine curriculum",
                "train_student.py:186-203 CosineDecay, :401-419 get_value(epoch) from epoch 1; "
                "run_cifar_distill.sh --decay_loops 10 of 240", "both: 10/240 of training, counted from epoch 1"),
        Setting("temperature", "Li et al. 2023: T learned adversarially",
                "train_student.py:89-90 --t_start 1 --t_end 20; models/temp_global.py: θ initialised to 1",
                ours="learned: 1 + 20·sigmoid(θ), θ = 1 at start"),
    ),
    params=(
        Param("ctkd_ramp", float, 10 / 240, "share of training over which the reversal strength lambda rises "
              "(cosine) from 0 to 1", cite="zhengli97/CTKD, train_student.py: CosineDecay(num_loops=10) of 240 epochs",
              range=share(), allowed="a share of training in [0, 1)", space=uniform(0.0, 0.2)),
        LOGIT_STANDARDIZE,
    ),
    notes="the temperature is learned: --temperature is refused; 0.1·CE + 0.9·KD (alpha 0.9) as its authors'")
# CTKD's weights: zhengli97/CTKD@7d5252241, train_student.py:79-80 (-r 0.1 for CE, -a 0.9 for KD) and
# scripts/run_cifar_distill.sh (-r 0.1 -a 0.9).
CTKD_WEIGHTS = (0.1, 0.9)


def kd_loss(z: Tensor, t: Tensor, temperature: float | Tensor, t_max: float | None = None) -> Tensor:
    """Hinton KD: ``T² · KL(softmax(t/T) ‖ softmax(z/T))``, batchmean. ``z``, ``t``: ``[B, K]`` → scalar.

    ``temperature`` may be a tensor with a graph (CTKD's learnable temperature): the teacher's logits are
    detached but the loss stays differentiable in ``T`` through both distributions, as in CTKD's DistillKL.
    Computed in float64 in an fp64 run and, as :mod:`~distillistic.core.divergences`, above ``PRECISE_ABOVE_T``:
    for a tensor ``T`` the bound ``t_max`` decides (reading ``T`` would sync the device every step).
    """
    bound = t_max if t_max is not None else (float(temperature) if not isinstance(temperature, Tensor) else 1.0)
    dtype = loss_dtype(z, bound)
    temp = temperature.to(dtype) if isinstance(temperature, Tensor) else temperature
    log_q = F.log_softmax(t.detach().to(dtype) / temp, dim=-1)
    log_p = F.log_softmax(z.to(dtype) / temp, dim=-1)
    loss = temp**2 * kl_batchmean(log_q.exp(), log_q, log_p)
    return loss.to(at_least_float32(z).dtype)


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``−λ`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def reverse_grad(x: Tensor, lam: float) -> Tensor:
    """``x`` unchanged; the gradient reaching ``x`` is ``−λ`` times the gradient of the loss w.r.t. the output.

    CTKD's reference multiplies by ``λ_ref`` and makes ``λ_ref`` run from 0 to −1; here the sign lives in the
    function and ``λ`` runs from 0 to 1 (``λ = −λ_ref``), the same gradient.
    """
    out: Tensor = GradientReversal.apply(x, lam)
    return out


def cosine_lambda(progress: float, lambda_max: float = 1.0, lambda_min: float = 0.0,
                  ramp: float = 10 / 240) -> float:
    """CTKD's reversal strength: a cosine ramp from ``lambda_min`` at 0 to ``lambda_max`` at ``ramp``, then flat.

    ``progress`` and ``ramp`` are shares of training (e.g. ``epoch / epochs``): ``λ = λ_min + (λ_max − λ_min) ·
    (1 − cos(π·min(progress / ramp, 1))) / 2``. Reference (CTKD ``CosineDecay(max_value=0, min_value=-1,
    num_loops=10)`` called with the 1-based epoch of 240): ``λ_ref = −λ`` with these defaults when ``progress``
    is :func:`~distillistic.core.objective.epoch_progress` (the 1-based epoch over the epochs), as CTKDTerm passes.
    """
    share = 1.0 if ramp <= 0 else min(max(progress, 0.0) / ramp, 1.0)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * share)) / 2.0


class LearnableTemperature(nn.Module):
    """CTKD's global temperature (Li et al. 2023, AAAI): ``T = t_min + t_range·sigmoid(θ)``, θ trained adversarially.

    Reference (``Global_T`` and ``train_student.py``): θ a one-element parameter initialised to 1, ``T = 1 +
    20·sigmoid(θ)`` (so ``T ∈ (1, 21)``, initially ≈ 15.62), the gradient reversed on θ before the sigmoid
    (equal to reversing it on ``T``: the chain rule is linear). θ is a 0-d parameter here. The reference trains θ
    with the students' SGD (same learning rate, momentum and weight decay).
    """

    def __init__(self, t_min: float = 1.0, t_range: float = 20.0, init: float = 1.0) -> None:
        super().__init__()
        self.t_min = t_min
        self.t_range = t_range
        self.theta = nn.Parameter(torch.tensor(float(init)))

    def forward(self, lam: float) -> Tensor:
        """The temperature, a 0-d float32 (fp64 run: float64) tensor whose gradient reaches θ multiplied by ``−lam``."""
        return self.t_min + self.t_range * torch.sigmoid(reverse_grad(at_least_float32(self.theta), lam))


class CTKDTerm(TeacherLogitTerm):
    """``T_i²·KL(softmax(t/T_i) ‖ softmax(z/T_i))`` with ``T_i = 1 + 20·sigmoid(θ_i)`` learned adversarially.

    Li et al. 2023 (CTKD, global temperature): θ_i gets the gradient reversed and scaled by ``λ(p)``, a cosine
    ramp from 0 to 1 over the first ``ramp`` share of training (:func:`cosine_lambda`). Each
    student ``i`` has its own θ_i, trained by its optimizer (:meth:`student_parameters`) and checkpointed with
    the objective; its temperature is logged per epoch (:meth:`stats`).
    """

    def __init__(self, teacher: LogitSource, students: int, ramp: float, standardize: bool, epochs: int = 0) -> None:
        super().__init__("ctkd", teacher, 1.0, standardize)
        self.ramp_share, self.epochs = ramp, epochs
        self.temperatures = nn.ModuleList(LearnableTemperature() for _ in range(students))
        self.t_max = 1.0 + 20.0  # the largest temperature T = 1 + 20·sigmoid(θ) reaches (float64 above 20)

    def current(self, i: int) -> Tensor:
        """Student ``i``'s temperature, a detached 0-d tensor."""
        return self.temperatures[i](0.0).detach()

    def targets(self, inp: StepInputs) -> list[Tensor]:
        t = self.teacher_logits(inp)
        return [torch.softmax(t / self.current(i), dim=-1).unsqueeze(0) for i in range(len(inp.logits))]

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        temperature = self.temperatures[i](cosine_lambda(epoch_progress(inp.progress, self.epochs), 1.0, 0.0,
                                                             self.ramp_share))
        zs, ts = self.pair(z, inp)
        return kd_loss(zs, ts, temperature, t_max=self.t_max)

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.temperatures[i].parameters()

    def stats(self, i: int) -> dict[str, float]:
        return {"ctkd_temperature": float(self.current(i))}

    def describe(self) -> str:
        return ("T²·KL(softmax(t/T) ‖ softmax(z/T)), T = 1 + 20·sigmoid(θ), θ trained through gradient reversal "
                f"(λ: cosine 0 → 1 over the first {self.ramp_share:.3g} of training){self._suffix()}")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher = logit_source(ctx.teacher, "ctkd")
    return (CTKDTerm(teacher, ctx.students, cfg.ctkd_ramp, cfg.logit_standardize, cfg.epochs),)


register_method(SPEC, terms, authors_weights=lambda cfg: CTKD_WEIGHTS)
