"""Similarity-preserving KD (Tung & Mori 2019, ICCV): the student's batch similarities match the teacher's.

``L = CE(z, y) + γ·||G_s − G_t||²_F / B²`` with ``G`` the row-normalised Gram matrix of a stage over the batch,
γ = 3000 (RepDistiller) [+ ``feature_kd``·T²·KL]. Reference: RepDistiller ``distiller_zoo/SP.py``.
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
from distillistic.methods.features import last_stage, parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    MDISTILLER_CFG,
    REPDISTILLER_SCRIPT,
    MethodSpec,
    Param,
    Setting,
)

WEIGHT = 3000.0  # RepDistiller's train_student.py: -b 3000 for similarity
SPEC = MethodSpec(
    "sp", "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)",
    "L = CE(z, y) + γ ||G_s - G_t||²_F / B², G the normalised batch Gram of sp_stage (γ = 3000) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("sp_stage", str, "last", "the stage whose batch similarities are matched (last: each model's last)",
                  cite="RepDistiller: feat[-2], the last stage before pooling")),
    defaults=(
        Setting("feature_weight", "—",
                f"{REPDISTILLER_SCRIPT}: similarity -b 3000; "
                f"{MDISTILLER_CFG}:123 FEAT_WEIGHT 3000.0", ours="3000"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)

def _gram_rows(f: torch.Tensor) -> torch.Tensor:
    q = _full(f).flatten(1)
    return F.normalize(q @ q.t(), dim=1)


def sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Similarity preserving (Tung & Mori 2019, eqs. 2-4): ``||G_s - G_t||_F^2 / B^2``.

    ``fs``: ``[B, ...]``, ``ft``: ``[B, ...]`` (any widths). ``G = row_normalize(Q Q^T)`` with ``Q`` the flattened
    features, ``[B, B]``. As RepDistiller's ``Similarity`` (verified by the paper's author), returned as a 0-d
    tensor rather than its shape-[1] one. Invariant to a positive scale of either feature tensor.
    """
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"sp_loss needs the same batch: {fs.shape[0]} vs {ft.shape[0]}")
    b = fs.shape[0]
    return (_gram_rows(fs) - _gram_rows(ft.detach())).pow(2).sum() / (b * b)


class Similarity(FeatureTerm):
    """Similarity preserving (Tung & Mori 2019): ``||G_s - G_t||_F^2 / B^2`` on one stage's batch Gram matrices."""

    def __init__(self, teacher: FeatureTeacher, student_stage: str, teacher_stage: str, weight: float) -> None:
        super().__init__("sp", teacher, (student_stage,), (teacher_stage,), weight)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return sp_loss(fs, ft)

    def describe(self) -> str:
        return f"SP(F_s, F_t)[{self._pairs()}]"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "sp")
    s_stage = last_stage(probe, "student") if cfg.sp_stage == "last" else cfg.sp_stage
    t_stage = last_stage(probe, "teacher") if cfg.sp_stage == "last" else cfg.sp_stage
    probe.shapes("teacher", (t_stage,))
    probe.shapes("student", (s_stage,))
    return with_kd(cfg, ctx, Similarity(teacher, s_stage, t_stage, weight(cfg, WEIGHT)))


register_method(SPEC, terms)
