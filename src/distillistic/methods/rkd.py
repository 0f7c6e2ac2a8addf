"""Relational KD (Park et al. 2019, CVPR): distances and angles between the samples' embeddings are matched.

``L = CE(z, y) + β·(25·Huber(ψ_D(s), ψ_D(t)) + 50·Huber(ψ_A(s), ψ_A(t)))`` on the embeddings, β = 1
[+ ``feature_kd``·T²·KL]. Reference: lenscloth/RKD ``metric/loss.py``; RepDistiller ``distiller_zoo/RKD.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.methods.features import parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    REPDISTILLER_SCRIPT,
    MethodSpec,
    Param,
    Setting,
    at_least,
    log_uniform,
)

WEIGHT = 1.0  # RepDistiller's train_student.py: -b 1 for rkd
SPEC = MethodSpec(
    "rkd", "Park et al. 2019, Relational Knowledge Distillation (CVPR)",
    "L = CE(z, y) + β (25 Huber(ψ_D(s), ψ_D(t)) + 50 Huber(ψ_A(s), ψ_A(t))) on the embeddings (β = 1) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("rkd_distance", float, 25.0, "weight of the distance loss",
                  cite="Park et al. 2019, sec. 4 (λ_D = 25)",
                  range=at_least(0.0), space=log_uniform(1.0, 100.0)),
            Param("rkd_angle", float, 50.0, "weight of the angle loss", cite="Park et al. 2019, sec. 4 (λ_A = 50)",
                  range=at_least(0.0), space=log_uniform(1.0, 100.0))),
    defaults=(
        Setting("feature_weight", "—",
                f"{REPDISTILLER_SCRIPT}: rkd -b 1 (distiller_zoo/RKD.py weighs 25 and 50 inside)",
                ours="1"),
        Setting("rkd_distance", "Park et al. 2019, sec. 4: λ_D = 25", "distiller_zoo/RKD.py: RKDLoss(w_d=25)"),
        Setting("rkd_angle", "Park et al. 2019, sec. 4: λ_A = 50", "distiller_zoo/RKD.py: RKDLoss(w_a=50)"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)

def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` via ``|a|^2 + |b|^2 - 2 a.b`` clamped at ``eps``, zero diagonal (RKD)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pdist(e)
    positive = d > 0  # the mean of the non-zero distances without boolean indexing, which would sync the host
    return d / ((d * positive).sum() / positive.sum())


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``cos`` of the angle at vertex ``i`` between ``e_j - e_i`` and ``e_k - e_i``, ``[B^3]`` (``[i, j, k]``)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(e_j - e_i); 0 when j = i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(es: torch.Tensor, et: torch.Tensor, w_dist: float = 25.0,
             w_angle: float = 50.0) -> dict[str, torch.Tensor]:
    """Relational KD (Park et al. 2019, eqs. 4-7) on embeddings ``es`` ``[B, ...]``, ``et`` ``[B, ...]``.

    distance = ``smooth_l1(psi_D(s), psi_D(t))`` with ``psi_D = ||e_i - e_j|| / mu`` and ``mu`` the mean of the
    non-zero pairwise distances; angle = ``smooth_l1(psi_A(s), psi_A(t))`` over all ``B^3`` triplets with
    ``psi_A = cos angle(e_j - e_i, e_k - e_i)``. Returns ``{"distance", "angle", "loss"}``, ``loss =
    w_dist * distance + w_angle * angle``. As RepDistiller's ``RKDLoss``: distances via the clamped (1e-12)
    squared expansion, Huber with delta 1 averaged over all ``B^2`` / ``B^3`` entries, degenerate triplets
    (``j = i`` or ``k = i``) included with cosine 0 on both sides.
    """
    if es.shape[0] != et.shape[0]:
        raise ValueError(f"rkd_loss needs the same batch: {es.shape[0]} vs {et.shape[0]}")
    s, t = _full(es).flatten(1), _full(et.detach()).flatten(1)
    distance = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
    angle = F.smooth_l1_loss(_angles(s), _angles(t))
    return {"distance": distance, "angle": angle, "loss": w_dist * distance + w_angle * angle}


class Relational(FeatureTerm):
    """Relational KD (Park et al. 2019): ``w_d·distance + w_a·angle`` on the embeddings."""

    def __init__(self, teacher: FeatureTeacher, weight: float, w_dist: float, w_angle: float) -> None:
        super().__init__("rkd", teacher, ("embedding",), ("embedding",), weight)
        self.w_dist, self.w_angle = w_dist, w_angle

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return rkd_loss(fs, ft, self.w_dist, self.w_angle)["loss"]

    def describe(self) -> str:
        return f"({self.w_dist:g}·RKD_D + {self.w_angle:g}·RKD_A)(e_s, e_t)"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "rkd")
    probe.shapes("teacher", ("embedding",))
    probe.shapes("student", ("embedding",))
    return with_kd(cfg, ctx, Relational(teacher, weight(cfg, WEIGHT), cfg.rkd_distance, cfg.rkd_angle))


register_method(SPEC, terms)
