"""Class attention transfer (Guo, Yan, Li & Lin 2023, CVPR): the student's class activation maps match the teacher's.

A model whose head is global average pooling + a linear layer ``W`` has, at each position of its last map ``F``,
the class activation map ``CAM = W·F`` ``[B, K, H, W]`` (the logits, less the bias, are its spatial mean).
``L = CE(z, y) + β·MSE(pool_r(CAM_s), pool_r(CAM_t))`` with the maps average-pooled to ``r x r`` (r = 2) and
optionally l2-normalised per class over the positions (off), β = 15 [+ ``feature_kd``·T²·KL]. Reference:
GzyAftermath/CAT-KD, ``mdistiller/distillers/CAT_KD.py`` and ``tools/train.py`` (the ``_test`` models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.methods.features import last_spatial_stages, parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    MethodSpec,
    Param,
    Setting,
    at_least,
    choice,
    int_range,
)

WEIGHT = 15.0  # CAT-KD configs/cifar100/CAT_KD/res32x4_res8x4.yaml: CAT_loss_weight 15. (β)
_CAT = "GzyAftermath/CAT-KD@4467073, configs/cifar100/CAT_KD/res32x4_res8x4.yaml"
SPEC = MethodSpec(
    "catkd", "Guo, Yan, Li & Lin 2023, Class Attention Transfer Based Knowledge Distillation (CVPR)",
    "L = CE(z, y) + β MSE(pool_r(W_s F_s), pool_r(W_t F_t)), W·F the class activation maps of the last stage "
    "(β = 15, r = 2) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("catkd_resolution", int, 2, "side of the grid the class activation maps are pooled to",
                  cite=f"{_CAT}: CAM_RESOLUTION 2", range=at_least(1),
                  allowed="a whole number > 0", space=int_range(1, 4)),
            Param("catkd_normalize", bool, False, "l2-normalise each class's pooled map over its positions",
                  cite=f"{_CAT}: IF_NORMALIZE False", space=choice(False, True))),
    notes="β depends on the pair in the authors' configs (0.5 to 600; 15 for resnet32x4 -> resnet8x4)",
    defaults=(
        Setting("feature_weight", "— (the paper's text was not checked here)",
                f"{_CAT}:25 CAT_loss_weight 15.; by pair 0.5 (imagenet r34_r18) to 600 (res32x4_shuv1); "
                "mdistiller/engine/cfg.py:37 400.0", "the res32x4 -> res8x4 config's 15", ours="15"),
        Setting("catkd_resolution", "— (the paper's text was not checked here)",
                f"{_CAT}: CAM_RESOLUTION 2; 4 for the ShuffleNet students and imagenet r34_r18"),
        Setting("catkd_normalize", "— (the paper's text was not checked here)",
                f"{_CAT}: IF_NORMALIZE False; True for the ShuffleNet and MobileNet students; cfg.py:27 True",
                "the res32x4 -> res8x4 config's False"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)


def class_activation(f: Tensor, weight: Tensor) -> Tensor:
    """``CAM[b, k] = Σ_c W[k, c]·F[b, c]``: a 1x1 convolution without bias (the authors' ``conv_test``, whose weight
    is the classifier's ``fc.weight``). ``f``: ``[B, C, H, W]``, ``weight``: ``[K, C]`` -> ``[B, K, H, W]``."""
    return torch.einsum("kc,bchw->bkhw", weight.to(f.dtype), f)


def cat_loss(cam_s: Tensor, cam_t: Tensor, resolution: int = 2, normalize: bool = False) -> Tensor:
    """CAT loss (CAT-KD ``CAT_loss``): ``MSE(n(pool_r(CAM_s)), n(pool_r(CAM_t)))`` over every element.

    ``cam_s``, ``cam_t``: ``[B, K, H, W]`` (any grids); both are adaptive-average-pooled to ``r x r``; ``n`` is
    ``F.normalize(·, dim=(2, 3))`` (per sample and class, l2 over the positions) when ``normalize``, else identity.
    """
    s = F.adaptive_avg_pool2d(_full(cam_s), (resolution, resolution))
    t = F.adaptive_avg_pool2d(_full(cam_t.detach()), (resolution, resolution))
    if normalize:
        s, t = (F.normalize(m, dim=(2, 3)) for m in (s, t))  # type: ignore[arg-type]  # a tuple works (norm)
    return F.mse_loss(s, t)


class ClassAttention(FeatureTerm):
    """CAT-KD: MSE of the pooled class activation maps ``W·F`` of each student's last stage and the teacher's."""

    def __init__(self, teacher: FeatureTeacher, student_stage: str, teacher_stage: str, weight: float,
                 heads: Sequence[nn.Linear], teacher_head: nn.Linear, resolution: int, normalize: bool) -> None:
        super().__init__("catkd", teacher, (student_stage,), (teacher_stage,), weight)
        # the models' own classifiers, in a tuple so that they are not this term's submodules (nor its state)
        self._heads = (tuple(heads), teacher_head)
        self.resolution, self.normalize = resolution, normalize

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        heads, teacher_head = self._heads
        with torch.autocast(device_type=fs.device.type, enabled=False):
            cam_s = class_activation(_full(fs), heads[i].weight)
            with torch.no_grad():
                cam_t = class_activation(_full(ft), teacher_head.weight)
            return cat_loss(cam_s, cam_t, self.resolution, self.normalize)

    def describe(self) -> str:
        norm = "normalised " if self.normalize else ""
        return f"CAT({norm}CAM_s, CAM_t; {self.resolution}x{self.resolution})[{self._pairs()}]"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "catkd")
    s_stage, t_stage = last_spatial_stages(probe, cfg, "catkd", "transfers class activation maps")
    heads = [probe.classifier("student", s_stage, i) for i in range(ctx.students)]
    term = ClassAttention(teacher, s_stage, t_stage, weight(cfg, WEIGHT), heads,
                          probe.classifier("teacher", t_stage), cfg.catkd_resolution, cfg.catkd_normalize)
    return with_kd(cfg, ctx, term)


register_method(SPEC, terms)
