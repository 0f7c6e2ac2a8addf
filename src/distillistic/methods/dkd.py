"""Decoupled knowledge distillation (Zhao et al. 2022, CVPR): KD split into its target and non-target parts.

``L = CE(z, y) + min(p/w, 1)·T²·(α·TCKD + β·NCKD)`` with TCKD the KL of the binary [target, rest] distributions
and NCKD the KL over the ``K − 1`` non-target classes (eq. 7), warmed up linearly over a share ``w`` of training.
Reference: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (CIFAR-100: α = 1, β = 8, T = 4, warm-up
20 of 240 epochs).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.logits import kl_batchmean
from distillistic.core.objective import Term
from distillistic.core.precision import loss_dtype
from distillistic.core.signals import StepInputs
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Param, at_least, log_uniform, share, uniform

_MDISTILLER = "megvii-research/mdistiller, configs/cifar100/dkd/res32x4_res8x4.yaml"
SPEC = MethodSpec(
    "dkd", "Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)",
    "L = CE(z, y) + min(p/w, 1) T² (α TCKD + β NCKD); TCKD on [p_y, 1-p_y], NCKD on the non-target classes",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0, composition="sum",
    weights=("dkd_alpha", "dkd_beta", "dkd_warmup"), reads=("temperature",),
    params=(
        Param("dkd_alpha", float, 1.0, "weight alpha of the target-class term TCKD", cite=f"{_MDISTILLER}: ALPHA 1.0",
              range=at_least(0.0), allowed="a weight >= 0", space=uniform(0.0, 2.0)),
        Param("dkd_beta", float, 8.0, "weight beta of the non-target-class term NCKD",
              cite=f"{_MDISTILLER}: BETA 8.0 (the paper's table 8: 2, 6 or 8 by pair)", range=at_least(0.0),
              allowed="a weight >= 0", space=log_uniform(0.5, 16.0)),
        Param("dkd_warmup", float, 20 / 240, "share of training over which the DKD term rises linearly from 0",
              cite=f"{_MDISTILLER}: WARMUP 20 (of 240 epochs)", range=share(), allowed="a share of training in [0, 1)"),
        LOGIT_STANDARDIZE,
    ))


def _split_target(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The target logit ``[B, 1]`` and the ``K − 1`` non-target logits ``[B, K − 1]`` (in class order)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError("DKD needs at least two classes")
    y = y.long().view(-1, 1)
    # column j < y keeps class j, j >= y takes class j + 1: a gather, no boolean mask (that would sync the GPU)
    cols = torch.arange(k - 1, device=logits.device).expand(logits.shape[0], -1)
    return logits.gather(1, y), logits.gather(1, cols + (cols >= y).long())


def dkd_loss(z: Tensor, t: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al. 2022, CVPR, eq. 7): ``{"tckd", "nckd", "loss"}``, each a scalar.

    ``tckd = KL([p_t,y, 1 − p_t,y] ‖ [p_s,y, 1 − p_s,y])``, ``nckd = KL(p̂_t ‖ p̂_s)`` with ``p̂`` the softmax over
    the ``K − 1`` non-target classes, both at ``T`` and batchmean; ``loss = T²·(α·tckd + β·nckd)``; the "tckd"
    and "nckd" entries are without ``T²``. Defaults: mdistiller's CIFAR-100 setting (α = 1, β = 8, T = 4, with
    warm-up 20 epochs: multiply by ``linear_warmup``). Identity: ``KL(p_t ‖ p_s) = tckd + (1 − p_t,y)·nckd``.

    Deviations from the reference (same values, computed more robustly): the reference masks the target logit
    by subtracting 1000 before the softmax; here the ``K − 1`` non-target logits are gathered, so nothing leaks
    whatever the logits' scale. The reference takes ``log`` of the summed probabilities ``[p_y, Σ_{k≠y} p_k]``,
    which is ``−inf`` (and the KL NaN) once ``1 − p_y`` underflows; here the binary log-probabilities are
    ``log_softmax([z_y, logsumexp_{k≠y} z_k] / T)``, exact and finite.
    """
    dtype = loss_dtype(z, temperature)  # float64 in an fp64 run and above PRECISE_ABOVE_T
    zt_s, zn_s = _split_target(z.to(dtype) / temperature, y)
    zt_t, zn_t = _split_target(t.detach().to(dtype) / temperature, y)
    log_b_s = F.log_softmax(torch.cat([zt_s, torch.logsumexp(zn_s, dim=1, keepdim=True)], dim=1), dim=1)
    log_b_t = F.log_softmax(torch.cat([zt_t, torch.logsumexp(zn_t, dim=1, keepdim=True)], dim=1), dim=1)
    tckd = kl_batchmean(log_b_t.exp(), log_b_t, log_b_s)
    log_n_s, log_n_t = F.log_softmax(zn_s, dim=1), F.log_softmax(zn_t, dim=1)
    nckd = kl_batchmean(log_n_t.exp(), log_n_t, log_n_s)
    return {"tckd": tckd, "nckd": nckd, "loss": temperature**2 * (alpha * tckd + beta * nckd)}


def linear_warmup(progress: float, warmup: float) -> float:
    """``min(progress / warmup, 1)`` (DKD's loss warm-up; ``warmup <= 0`` means none).

    mdistiller calls it with the 1-based epoch and ``warmup = 20``: the first epoch already weighs 1/20.
    """
    if warmup <= 0:
        return 1.0
    return min(max(progress, 0.0) / warmup, 1.0)


class DKDTerm(TeacherLogitTerm):
    """``min(p / w, 1)·T²·(α·TCKD + β·NCKD)`` (Zhao et al. 2022, eq. 7; :func:`dkd_loss`)."""

    def __init__(self, teacher: LogitSource, alpha: float, beta: float, temperature: float, warmup: float,
                 standardize: bool) -> None:
        super().__init__("dkd", teacher, temperature, standardize, functools.partial(linear_warmup, warmup=warmup))
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return dkd_loss(zs, ts, inp.labels, self.alpha, self.beta, self.temperature)["loss"]

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        warm = f"min(p/{self.warmup:.3g}, 1)·" if self.warmup > 0 else ""
        return (f"{warm}{t}²·({self.alpha:g}·TCKD + {self.beta:g}·NCKD)(softmax(t/{t}) ‖ softmax(z/{t}))"
                f"{self._suffix()}")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    teacher = logit_source(ctx.teacher, "dkd")
    return (DKDTerm(teacher, cfg.dkd_alpha, cfg.dkd_beta, cfg.temperature, cfg.dkd_warmup, cfg.logit_standardize),)


register_method(SPEC, terms)
