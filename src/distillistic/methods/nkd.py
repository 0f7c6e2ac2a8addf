"""Normalized KD (Yang et al. 2023, ICCV, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels"): the target and the normalised non-target parts.

``L = CE(z, y) − mean_b q_t,y·log p_s,y − γ·T²·mean_b Σ_{k≠y} q̂_t,k·log p̂_s,k`` with ``q_t = softmax(t)``,
``p_s = softmax(z)`` (at T = 1) and ``q̂_t``, ``p̂_s`` the softmax at ``T`` over the ``K − 1`` non-target logits
(the non-target distribution *normalised* to sum to 1). Reference: yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``.
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
from distillistic.methods.spec import MethodSpec, Param, Setting, at_least, log_uniform

_CLS_KD = "yzd-v/cls_KD @1e5d48f, configs/distillers/cifar100/res34_distill_res18_cifar.py lines 64-70"
SPEC = MethodSpec(
    "nkd", "Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation: NKD (ICCV)",
    "L = CE(z, y) - q_t,y log p_s,y - γ T² Σ_(k≠y) q̂_t,k log p̂_s,k; q_t, p_s at T = 1, q̂, p̂ the softmax(·/T) "
    "over the non-target classes",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=3.0, composition="sum",
    weights=("nkd_gamma",), reads=("temperature",),
    notes=f"T = 3 and gamma = 3.5: the authors' CIFAR-100 config ({_CLS_KD}); their ImageNet configs use T = 1, "
          "gamma = 1.5 (configs/distillers/imagenet/res34_distill_res18_img.py)",
    defaults=(
        Setting("nkd_gamma", "not read here", f"{_CLS_KD}: gamma 3.5; imagenet/res34_distill_res18_img.py: gamma 1.5",
                "the code's CIFAR-100 value (the CIFAR zoo's setting, as for DKD)"),
        Setting("temperature", "not read here", f"{_CLS_KD}: temp 3.0; imagenet/res34_distill_res18_img.py: temp 1.0",
                "the code's CIFAR-100 value", ours="3"),
    ),
    params=(
        Param("nkd_gamma", float, 3.5, "weight gamma of NKD's normalised non-target term",
              cite=f"{_CLS_KD}: NKDLoss(temp=3.0, gamma=3.5) (ImageNet configs: gamma 1.5, T 1)",
              range=at_least(0.0), allowed="a weight >= 0", space=log_uniform(0.5, 8.0)),
    ))


def _non_target(logits: Tensor, y: Tensor) -> Tensor:
    """The ``K − 1`` non-target logits ``[B, K − 1]`` of ``logits`` ``[B, K]``, in class order (a gather)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError("NKD needs at least two classes")
    cols = torch.arange(k - 1, device=logits.device).expand(logits.shape[0], -1)
    return logits.gather(1, cols + (cols >= y.view(-1, 1)).long())


def nkd_loss(z: Tensor, t: Tensor, y: Tensor, gamma: float = 3.5, temperature: float = 3.0) -> dict[str, Tensor]:
    """NKD (Yang et al. 2023; the reference's ``NKDLoss.forward``): ``{"target", "non_target", "loss"}``, each a scalar.

    ``z``, ``t``: student and teacher logits ``[B, K]``; ``y``: labels ``[B]``. ``target = −mean_b q_t,y·log
    p_s,y`` (both at T = 1, ``q_t`` detached), ``non_target = −mean_b Σ_{k≠y} q̂_t,k·log p̂_s,k`` (softmax at
    ``T`` over the non-target classes), ``loss = target + γ·T²·non_target``. A cross-entropy form, as the
    reference: its gradient is that of the KL, its value exceeds the KL by the teacher's entropy. Float32
    (float64 stays float64).
    """
    z, t = at_least_float32(z), at_least_float32(t.detach())
    y = y.long().view(-1, 1)
    log_p = F.log_softmax(z, dim=1).gather(1, y)
    q = F.softmax(t, dim=1).gather(1, y)
    target = -(q * log_p).mean()
    log_p_n = F.log_softmax(_non_target(z, y) / temperature, dim=1)
    q_n = F.softmax(_non_target(t, y) / temperature, dim=1)
    non_target = -(q_n * log_p_n).sum(dim=1).mean()
    return {"target": target, "non_target": non_target, "loss": target + gamma * temperature**2 * non_target}


class NKDTerm(TeacherLogitTerm):
    """``−q_t,y·log p_s,y − γ·T²·Σ_{k≠y} q̂_t,k·log p̂_s,k`` (Yang et al. 2023; :func:`nkd_loss`)."""

    def __init__(self, teacher: LogitSource, gamma: float, temperature: float) -> None:
        super().__init__("nkd", teacher, temperature, False)
        self.gamma = gamma

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return nkd_loss(zs, ts, inp.labels, self.gamma, self.temperature)["loss"]

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        return (f"[−q_y·log p_y − {self.gamma:g}·{t}²·Σ_(k≠y) q̂_k·log p̂_k](q = softmax(t), p = softmax(z); "
                f"q̂, p̂ at T = {t} over k ≠ y)")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    return (NKDTerm(logit_source(ctx.teacher, "nkd"), cfg.nkd_gamma, cfg.temperature),)


register_method(SPEC, terms)
