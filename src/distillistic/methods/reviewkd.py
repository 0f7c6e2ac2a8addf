"""Knowledge review (Chen, Liu, Zhao & Jia 2021, CVPR): every teacher stage learns from the student's deeper ones.

The student's maps, deepest first (the pooled embedding as a 1x1 map, then each stage), go through attention-
based fusion (ABF): each level's map, after a 1x1 conv, is fused with the running residual of the deeper levels
by two per-pixel attention weights, then a 3x3 conv shapes it as the teacher's map of that level. The
hierarchical context loss (HCL) compares each level with its teacher map at full resolution and pooled to
4x4, 2x2 and 1x1 (weights 1, 1/2, 1/4, 1/8, normalised). ``L = CE(z, y) + β·min(e/(w·E), 1)·Σ_levels HCL``
with ``e`` the 1-based epoch of ``E``, β = 5, warm-up w = 20 of 240 epochs. Reference: megvii-research/mdistiller,
``mdistiller/distillers/ReviewKD.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, matched_shape
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import Term, epoch_progress
from distillistic.core.signals import StepInputs
from distillistic.errors import UserError
from distillistic.methods.dkd import linear_warmup
from distillistic.methods.features import parts, spatial, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    MethodSpec,
    Param,
    Setting,
    share,
)

WEIGHT = 5.0  # mdistiller configs/cifar100/reviewkd.yaml: REVIEWKD_WEIGHT 5.0 (res32x4 -> res8x4)
_MD = "megvii-research/mdistiller@a08d46f"
SPEC = MethodSpec(
    "reviewkd", "Chen, Liu, Zhao & Jia 2021, Distilling Knowledge via Knowledge Review (CVPR)",
    "L = CE(z, y) + β min(e/w, 1) Σ_levels HCL(ABF(F_s, deeper levels), F_t); HCL = MSE at full, 4², 2², 1² "
    "(β = 5) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("reviewkd_warmup", float, 20 / 240, "share of training over which the review term rises from 0",
                  cite=f"{_MD} mdistiller/engine/cfg.py:153 WARMUP_EPOCHS 20 (of 240 epochs, "
                       "configs/cifar100/reviewkd.yaml)", range=share(), allowed="a share of training in [0, 1)")),
    defaults=(
        Setting("feature_weight", "— (the paper's text was not checked here)",
                f"{_MD} configs/cifar100/reviewkd.yaml:10 REVIEWKD_WEIGHT 5.0 (res32x4 -> res8x4); "
                "mdistiller/engine/cfg.py:152 1.0 and configs/imagenet/*/reviewkd.yaml 1.0",
                "the CIFAR-100 config's 5 (ImageNet's 1 is not applied)", ours="5"),
        Setting("reviewkd_warmup", "— (the paper's text was not checked here)",
                f"{_MD} mdistiller/engine/cfg.py:153 WARMUP_EPOCHS 20 of 240, ReviewKD.py:96 min(epoch / warmup, 1), "
                "epoch from 1; configs/imagenet/r34_r18/reviewkd.yaml WARMUP_EPOCHS 1", "CIFAR-100's 20/240"),
        KD_T_FOR_FEATURES,
    ),
    **FEATURE)
MAX_MID = 512  # mdistiller ReviewKD.py:45, mid_channel = min(512, in_channels[-1])


def hcl_loss(fs_list: Sequence[Tensor], ft_list: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss (mdistiller ``hcl_loss``): ``Σ_levels Σ_l c_l·MSE(pool_l(f_s), pool_l(f_t)) / Σ c_l``.

    ``fs_list[k]``, ``ft_list[k]``: ``[B, C, H, W]`` of equal shapes. Per level: ``c = 1`` at full resolution,
    then ``1/2, 1/4, 1/8`` at adaptive-average-pooled ``4x4, 2x2, 1x1`` for each ``l < H`` (as the reference,
    the height decides; the pooling is ``l x l``); the weighted sum is divided by the sum of the weights used.
    """
    total = torch.zeros((), dtype=_full(fs_list[0]).dtype, device=fs_list[0].device)
    for fs, ft in zip(fs_list, ft_list, strict=True):
        fs, ft = _full(fs), _full(ft.detach())
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss needs equal shapes per level: {tuple(fs.shape)} vs {tuple(ft.shape)}")
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


class ABF(nn.Module):
    """Attention-based fusion (mdistiller ``ABF``): 1x1 conv + BN; fused with the deeper residual; 3x3 conv + BN.

    ``fuse``: the level has a deeper residual (every level but the embedding). Submodule names and the
    kaiming-uniform (a = 1) initialisation of both convs are the reference's, so its state dict loads here.
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        squeeze = nn.Conv2d(in_channel, mid_channel, 1, bias=False)
        shape = nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False)
        nn.init.kaiming_uniform_(squeeze.weight, a=1)
        nn.init.kaiming_uniform_(shape.weight, a=1)
        self.conv1 = nn.Sequential(squeeze, nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(shape, nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, C_s, h, w]``, ``residual`` ``[B, mid, h', w']`` (None at the deepest level) ->
        (the level's output ``[B, C_t, H, W]``, the fused map ``[B, mid, H, W]`` passed to the next level).

        The residual is resized (nearest) to ``(h, w)``; the fused map to the teacher's ``out_size`` (nearest).
        """
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _as_map(f: Tensor) -> Tensor:
    """``[B, D]`` -> ``[B, D, 1, 1]``; a map unchanged."""
    return f[:, :, None, None] if f.dim() == 2 else f


class Review(nn.Module):
    """One student's ABFs, shallow to deep (the last is the embedding's, without fusion)."""

    def __init__(self, s_channels: Sequence[int], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        mid = min(MAX_MID, s_channels[-1])
        last = len(s_channels) - 1
        self.abfs = nn.ModuleList(ABF(c, mid, t[1], k < last) for k, (c, t) in enumerate(zip(s_channels, t_shapes)))

    def forward(self, fs: Sequence[Tensor], t_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """The student's maps ``fs`` (shallow to deep, the embedding last) -> one output per level (same order)."""
        out: list[Tensor] = []
        residual: Tensor | None = None
        for k in reversed(range(len(fs))):
            y, residual = self.abfs[k](_as_map(fs[k]), residual, t_sizes[k])
            out.insert(0, y)
        return out


class ReviewTerm(FeatureTerm):
    """ReviewKD (Chen et al. 2021): HCL between each level's ABF output and the teacher's map of that level."""

    def __init__(self, teacher: FeatureTeacher, stages: Sequence[str], weight: float, warmup: float,
                 s_shapes: Sequence[Sequence[Sequence[int]]], t_shapes: Sequence[Sequence[int]],
                 epochs: int = 0) -> None:
        super().__init__("reviewkd", teacher, stages, stages, weight)
        # min(e / (w·E), 1) with e the 1-based epoch, as mdistiller's ReviewKD.forward_train (kwargs["epoch"])
        self.ramp = lambda p: linear_warmup(epoch_progress(p, epochs), warmup)
        self.warmup = warmup
        self.reviews = nn.ModuleList(
            Review([s[1] for s in shapes], [matched_shape(t, s) for t, s in zip(t_shapes, shapes)])
            for shapes in s_shapes)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        fs, ft = self.maps(i, inp)
        ft = [_as_map(_full(f)) for f in ft]
        outs = self.reviews[i]([_full(f) for f in fs], [(f.shape[2], f.shape[3]) for f in ft])
        return hcl_loss(outs, ft)

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.reviews[i].parameters()

    def describe(self) -> str:
        warm = f"min(e/{self.warmup:.3g}, 1)·" if self.warmup > 0 else ""
        return f"{warm}HCL(ABF(F_s), F_t)[{self._pairs()}]"


def review_stages(cfg: Config, ctx: Context) -> list[str]:
    """The spatial stages student and teacher share (by name, so by resolution), shallow to deep, + embedding."""
    _, probe = parts(ctx, "reviewkd")
    theirs = probe.stages("teacher")
    stages = [s for s in spatial(probe.stages("student")) if s in theirs]
    if not stages:
        raise UserError(f"algo reviewkd: the student '{cfg.model}' and the teacher '{cfg.teacher_arch}' share no "
                        f"spatial stage (student: {', '.join(probe.stages('student'))}; teacher: {', '.join(theirs)}); "
                        "choose models with stages (cnn, resnet18, ...)")
    return [*stages, "embedding"]


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "reviewkd")
    stages = review_stages(cfg, ctx)
    t_shapes = probe.shapes("teacher", stages)
    s_shapes = [probe.shapes("student", stages, i) for i in range(ctx.students)]
    term = ReviewTerm(teacher, stages, weight(cfg, WEIGHT), cfg.reviewkd_warmup,
                      [[s[n] for n in stages] for s in s_shapes], [t_shapes[n] for n in stages], cfg.epochs)
    return with_kd(cfg, ctx, term)


register_method(SPEC, terms)
