"""Attention transfer (Zagoruyko & Komodakis 2017, ICLR): the student's spatial attention maps match the teacher's.

``L = CE(z, y) + β·Σ_stages mean((a_s − a_t)²)``, ``a = normalize(mean_c F²)``, β = 1000 (the authors' code and
RepDistiller) [+ ``feature_kd``·T²·KL]. Reference: szagoruyko/attention-transfer ``utils.py``; RepDistiller
``distiller_zoo/AT.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, pool_to
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.errors import UserError
from distillistic.methods.features import parts, spatial, weight, with_kd
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

WEIGHT = 1000.0  # szagoruyko/attention-transfer cifar.py --beta 1e+3; RepDistiller -b 1000
SPEC = MethodSpec(
    "at", "Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR)",
    "L = CE(z, y) + β sum_stages mean((a_s - a_t)²), a = normalize(mean_c F²) (β = 1000) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("at_stages", tuple, (), "the stages compared (default: every stage student and teacher share)",
                  cite="Zagoruyko & Komodakis 2017, sec. 4.1 (every group's output)")),
    defaults=(
        Setting("feature_weight", "—",
                f"{REPDISTILLER_SCRIPT}: attention -b 1000; "
                f"{MDISTILLER_CFG}:71 FEAT_WEIGHT 1000.0; szagoruyko/"
                "attention-transfer cifar.py --beta 1e+3", ours="1000"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)

def _common_grid(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps pooled to the smaller height and the smaller width (each dimension on its own).

    RepDistiller's AT compares heights only and pools to a square ``(H, H)``; pooling each dimension to its
    minimum is the same for square maps and also right for non-square ones.
    """
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    return pool_to(fs, size), pool_to(ft, size)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention (Zagoruyko & Komodakis 2017, eq. 2): ``a = normalize(mean_c |F_c|^p)``, ``[B, H*W]``.

    ``f``: ``[B, C, H, W]``. The l2 normalisation is per sample (``F.normalize``, eps 1e-12), so ``a`` does not
    change when ``f`` is multiplied by a positive constant. The paper's ``|F|^p`` is kept; RepDistiller writes
    ``f.pow(p)``, which is the same for the even ``p = 2`` that every reference run uses.
    """
    if f.dim() != 4:
        raise ValueError(f"attention_map expects a [B, C, H, W] map, got shape {tuple(f.shape)}")
    f = _full(f)
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(fs_list: Sequence[torch.Tensor], ft_list: Sequence[torch.Tensor], beta: float = 1000.0,
            p: float = 2.0) -> torch.Tensor:
    """Attention transfer: ``beta * sum_stages mean_{b, j} (a_s[b, j] - a_t[b, j])^2``.

    ``fs_list[i]``, ``ft_list[i]``: ``[B, C_s, H, W]`` and ``[B, C_t, H', W']``; channels may differ, the larger
    grid is average-pooled to the smaller (RepDistiller). The reduction is the authors' code: the mean over
    batch and positions of the squared difference per stage, summed over stages, times ``beta = 1000``
    (szagoruyko/attention-transfer cifar.py ``opt.beta * sum(loss_groups)`` with ``--beta 1e+3``, RepDistiller
    ``-b 1000`` times ``sum(loss_group)``, mdistiller the same). The paper's eq. 2 writes ``beta / 2`` with the
    norm unsquared; neither reference implements the 1/2, so ``beta`` here multiplies the sum as in both codes
    (DESIGN.md's ``beta/2`` equals ``at_loss(..., beta=500)``).
    """
    if len(fs_list) != len(ft_list) or not fs_list:
        raise ValueError(f"at_loss needs the same non-zero number of stages, got {len(fs_list)} and {len(ft_list)}")
    total = torch.zeros((), dtype=_full(fs_list[0]).dtype, device=fs_list[0].device)
    for fs, ft in zip(fs_list, ft_list, strict=True):
        s, t = _common_grid(fs, ft.detach())
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return beta * total


class Attention(FeatureTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017): ``sum_stages mean (a_s - a_t)^2``, ``a = norm(mean_c F^2)``."""

    def __init__(self, teacher: FeatureTeacher, stages: Sequence[str], weight: float) -> None:
        super().__init__("at", teacher, stages, stages, weight)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        fs, ft = self.maps(i, inp)
        return at_loss(fs, ft, beta=1.0)

    def describe(self) -> str:
        return f"AT(F_s, F_t)[{self._pairs()}]"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "at")
    stages = list(cfg.at_stages)
    if not stages:
        theirs = probe.stages("teacher")
        stages = [s for s in spatial(probe.stages("student")) if s in theirs]
        if not stages:
            raise UserError(f"algo at: the student '{cfg.model}' and the teacher '{cfg.teacher_arch}' share no spatial "
                            f"stage (student: {', '.join(probe.stages('student'))}; teacher: {', '.join(theirs)}); "
                            "choose models with stages")
    probe.shapes("teacher", stages)  # an unknown name is refused here, with the model's stages
    probe.shapes("student", stages)
    return with_kd(cfg, ctx, Attention(teacher, stages, weight(cfg, WEIGHT)))


register_method(SPEC, terms)
