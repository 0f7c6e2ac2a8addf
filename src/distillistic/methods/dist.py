"""DIST (Huang et al. 2022, NeurIPS, Knowledge Distillation from A Stronger Teacher): relations, not values.

``L = CE(z, y) + τ²·(β·(1 − mean_b ρ(p_b, q_b)) + γ·(1 − mean_k ρ(p_:k, q_:k)))`` with ρ the Pearson correlation of
the softened student ``p`` and teacher ``q`` predictions, across classes (inter) and across the batch (intra).
Reference: hunto/DIST_KD, ``classification/lib/models/losses/dist_kd.py``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Param, Setting, at_least, log_uniform

_DIST = "hunto/DIST_KD, classification/configs/strategies/distill/dist_cifar.yaml (kd_loss_weight 2, β = γ = 1)"
SPEC = MethodSpec(
    "dist", "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS): DIST",
    "L = CE(z, y) + τ² (β (1 - mean_b pearson_K) + γ (1 - mean_k pearson_B)) of softmax(z/τ), softmax(t/τ)",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0, composition="sum",
    weights=("dist_beta", "dist_gamma"), reads=("temperature",),
    defaults=(
        Setting("dist_beta", "Huang et al. 2022, eq. 8: β = γ = 2",
                "hunto/image_classification_sota@2bc4832, lib/models/losses/dist_kd.py: DIST(beta=1) × "
                "kd_loss_weight 2 (configs/strategies/distill/dist_cifar.yaml)"),
        Setting("dist_gamma", "Huang et al. 2022, eq. 8: γ = 2", "DIST(gamma=1) × kd_loss_weight 2"),
        Setting("temperature", "—",
                "dist_cifar.yaml: kd dist_t4; resnet_dist.yaml: τ 1", "4; --temperature 1 for ImageNet's",
                ours="4"),
    ),
    params=(
        Param("dist_beta", float, 2.0, "weight beta of the inter-class relation term", cite=f"{_DIST}; paper eq. 8",
              range=at_least(0.0), allowed="a weight >= 0", space=log_uniform(0.25, 8.0)),
        Param("dist_gamma", float, 2.0, "weight gamma of the intra-class relation term", cite=f"{_DIST}; paper eq. 8",
              range=at_least(0.0), allowed="a weight >= 0", space=log_uniform(0.25, 8.0)),
        LOGIT_STANDARDIZE,
    ))


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` ``[N, D]`` → ``[N]``.

    As the reference: cosine of the centred rows with ``eps`` added to the product of the norms.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(z: Tensor, t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> dict[str, Tensor]:
    """DIST (Huang et al. 2022, NeurIPS): ``{"inter", "intra", "loss"}``, each a scalar.

    With ``y = softmax(·/τ)`` ``[B, K]``: ``inter = 1 − mean_b pearson(y_s[b, :], y_t[b, :])``,
    ``intra = 1 − mean_k pearson(y_s[:, k], y_t[:, k])`` (over the batch), ``loss = τ²·(β·inter + γ·intra)``;
    "inter" and "intra" are without ``τ²``. Defaults are the reference's ``DIST(beta=1, gamma=1, tau=1)``; its
    published configs weigh the whole term by ``kd_loss_weight = 2`` (the paper's β = γ = 2): ImageNet with
    τ = 1 (``resnet_dist.yaml``), CIFAR-100 with τ = 4 (``dist_cifar.yaml``, ``kd: dist_t4``). The intra term
    needs the whole batch (B ≥ 2); it is not a per-sample loss.
    """
    y_s = F.softmax(at_least_float32(z) / tau, dim=1)
    y_t = F.softmax(at_least_float32(t.detach()) / tau, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return {"inter": inter, "intra": intra, "loss": tau**2 * (beta * inter + gamma * intra)}


class DISTTerm(TeacherLogitTerm):
    """``τ²·(β·(1 − mean_b ρ(p_b, q_b)) + γ·(1 − mean_k ρ(p_:k, q_:k)))`` (Huang et al. 2022; ρ Pearson)."""

    def __init__(self, teacher: LogitSource, beta: float, gamma: float, temperature: float, standardize: bool) -> None:
        super().__init__("dist", teacher, temperature, standardize)
        self.beta, self.gamma = beta, gamma

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return dist_loss(zs, ts, self.beta, self.gamma, self.temperature)["loss"]

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        return f"{t}²·({self.beta:g}·inter + {self.gamma:g}·intra)(softmax(t/{t}), softmax(z/{t})){self._suffix()}"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    teacher = logit_source(ctx.teacher, "dist")
    return (DISTTerm(teacher, cfg.dist_beta, cfg.dist_gamma, cfg.temperature, cfg.logit_standardize),)


register_method(SPEC, terms)
