"""FitNets (Romero et al. 2015, ICLR): the student's map, through a trained regressor, matches the teacher's.

``L = CE(z, y) + β·mean((r(F_s) − F_t)²)`` on one stage (a hint), ``r`` a 1x1 conv + BN, β = 100 (RepDistiller)
[+ ``feature_kd``·T²·KL]. Reference: HobbitLong/RepDistiller, ``distiller_zoo/FitNet.py``, ``models/util.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, matched_shape
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
    MDISTILLER_CFG,
    REPDISTILLER_SCRIPT,
    MethodSpec,
    Param,
    Setting,
)

WEIGHT = 100.0  # RepDistiller's train_student.py: -b 100 for hint
SPEC = MethodSpec(
    "fitnet", "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)",
    "L = CE(z, y) + β mean((r(F_s) - F_t)²) on hint_stage, r a trained 1x1 conv + BN (β = 100) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("hint_stage", str, "stage2", "the stage whose map the student regresses onto the teacher's",
                  cite="RepDistiller's train_student.py: --hint_layer 2")),
    defaults=(
        Setting("feature_weight", "—",
                f"{REPDISTILLER_SCRIPT}: hint -b 100; "
                f"{MDISTILLER_CFG}:90 FEAT_WEIGHT 100.0", ours="100"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)

def hint_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015, eq. 3): ``mean((r(F_s) - F_t)^2)`` over every element.

    ``fs``: the regressed student features ``r(F_s)`` (see :func:`make_regressor`), same shape as ``ft``
    (``[B, C, H, W]`` or ``[B, D]``). The mean over all elements is RepDistiller's ``nn.MSELoss()``; the paper's
    ``1/2 ||.||^2`` differs by a constant factor that the loss weight absorbs (RepDistiller uses weight 100).
    """
    if fs.shape != ft.shape:
        raise ValueError(f"hint_loss needs equal shapes (regress the student first): {tuple(fs.shape)} vs "
                         f"{tuple(ft.shape)}")
    return F.mse_loss(_full(fs), _full(ft.detach()))


class _ConvRegressor(nn.Module):
    """1x1 conv + BN (+ ReLU) at the student's resolution, then resized to the teacher's ``(H, W)``."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int], relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_s, H_s, W_s]`` -> ``[B, C_t, H_t, W_t]``."""
        y = self.relu(self.bn(self.conv(x)))
        if tuple(y.shape[-2:]) == self.size:
            return y
        if y.shape[-2] >= self.size[0] and y.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(y, self.size)
        return F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)


def make_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = False) -> nn.Module:
    """The FitNets regressor ``r`` from a student feature shape to a teacher one (shapes include the batch).

    4-D ``[B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]``: 1x1 conv + BatchNorm, then adaptive average pooling when
    the student map is larger, bilinear interpolation when it is smaller. 2-D ``[B, D_s] -> [B, D_t]``: Linear.

    Deviation from RepDistiller's ``ConvReg``: it picks a 3x3 stride-2 conv (``H_s = 2 H_t``), a 4x4 transposed
    conv (``2 H_s = H_t``) or a ``(1 + H_s - H_t)`` valid conv, and fails otherwise. A 1x1 conv followed by a
    parameter-free resize handles every ratio (including the non-integer ones of cross-resolution KD) with the
    fewest parameters. ``relu=False`` by default, unlike ``ConvReg(use_relu=True)``: torchvision's stage outputs
    (MobileNet's linear bottlenecks, ConvNeXt's stages) are signed, which a ReLU could never match; pass
    ``relu=True`` for post-ReLU hints such as ResNet stages to reproduce RepDistiller.
    """
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if len(s) == 4 and len(t) == 4:
        return _ConvRegressor(s[1], t[1], (t[2], t[3]), relu)
    if len(s) == 2 and len(t) == 2:
        return nn.Sequential(nn.Linear(s[1], t[1]), nn.ReLU()) if relu else nn.Linear(s[1], t[1])
    raise ValueError(f"make_regressor needs two 4-D or two 2-D shapes, got {s} and {t}")


class FitNet(FeatureTerm):
    """FitNets hint (Romero et al. 2015, eq. 3): ``mean((r_i(F_s) - F_t)^2)`` with a trained regressor per student."""

    def __init__(self, teacher: FeatureTeacher, student_stage: str, teacher_stage: str, weight: float,
                 student_shapes: Sequence[Sequence[int]], teacher_shape: Sequence[int]) -> None:
        super().__init__("fitnet", teacher, (student_stage,), (teacher_stage,), weight)
        self.regressors = nn.ModuleList(make_regressor(s, matched_shape(teacher_shape, s)) for s in student_shapes)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return hint_loss(self.regressors[i](fs), ft)

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.regressors[i].parameters()

    def describe(self) -> str:
        return f"MSE(r(F_s), F_t)[{self._pairs()}]"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "fitnet")
    stage = cfg.hint_stage
    t_shape = probe.shapes("teacher", (stage,))[stage]
    s_shapes = [probe.shapes("student", (stage,), i)[stage] for i in range(ctx.students)]
    return with_kd(cfg, ctx, FitNet(teacher, stage, stage, weight(cfg, WEIGHT), s_shapes, t_shape))


register_method(SPEC, terms)
