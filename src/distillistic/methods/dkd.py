"""Decoupled knowledge distillation (Zhao et al. 2022, CVPR): KD split into its target and non-target parts.

``L = CE(z, y) + min(p/w, 1)·T²·(α·TCKD + β·NCKD)`` with TCKD the KL of the binary [target, rest] distributions
and NCKD the KL over the ``K − 1`` non-target classes (eq. 7), warmed up linearly over a share ``w`` of training.
Reference: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (CIFAR-100: α = 1, T = 4, warm-up 20 of 240
epochs counted from epoch 1, β 2, 6 or 8 by teacher–student pair; ImageNet: warm-up 1 epoch). With
``--logit-standardize``: α and β times 9 and T = 2, as the logit-standardisation authors' ``tools/train.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config, student_archs
from distillistic.core.logits import kl_batchmean
from distillistic.core.objective import Term, epoch_progress
from distillistic.core.precision import loss_dtype
from distillistic.core.signals import StepInputs
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method, student_count
from distillistic.methods.spec import (
    LOGIT_STANDARDIZE,
    MethodSpec,
    Param,
    Setting,
    at_least,
    log_uniform,
    share,
    uniform,
)

_MDISTILLER = "megvii-research/mdistiller@a08d46f, configs/cifar100/dkd"
_CFG = "mdistiller/engine/cfg.py"  # of megvii-research/mdistiller@a08d46f
_LS = "sunshangquan/logit-standardization-KD@f6e5aa5, tools/train.py:115-118"
# β per teacher–student pair of the CIFAR-100 zoo: mdistiller's configs/cifar100/dkd/<pair>.yaml (BETA; unset: 8.0,
# cfg.py), the paper's table 8. Any other pair: 8.0.
BETA_BY_PAIR: dict[tuple[str, str], float] = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,  # res56_res20.yaml, res110_res32.yaml
    ("resnet32x4", "resnet8x4"): 8.0, ("resnet32x4", "shufflenetv1"): 8.0, ("resnet32x4", "shufflenetv2"): 8.0,
    ("wrn_40_2", "shufflenetv1"): 8.0,  # res32x4_res8x4, res32x4_shuv1, res32x4_shuv2, wrn40_2_shuv1: cfg.py's 8.0
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0,
}
DEFAULT_BETA = 8.0  # mdistiller/engine/cfg.py: CFG.DKD.BETA
LS_KD_WEIGHT, LS_TEMPERATURE = 9.0, 2.0  # logit standardisation: α and β times 9, T = 2 (tools/train.py:115-118)
SPEC = MethodSpec(
    "dkd", "Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)",
    "L = CE(z, y) + min(e/w, 1) T² (α TCKD + β NCKD); TCKD on [p_y, 1-p_y], NCKD on the non-target classes",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0, composition="sum",
    weights=("dkd_alpha", "dkd_beta", "dkd_warmup"), reads=("temperature",),
    defaults=(
        Setting("dkd_alpha", "—", f"{_CFG}:164: ALPHA 1.0; {_LS}: ×9 with --logit-stand",
                ours="1 (9 with --logit-standardize)"),
        Setting("dkd_beta", "Zhao et al. 2022, table 8 (β by pair: 8 for ResNet32×4→ResNet8×4 …)",
                f"{_MDISTILLER}/<pair>.yaml: BETA 2.0 (res56_res20, res110_res32), 6.0 (vgg13_*, wrn40_2_wrn_*), "
                "else cfg.py:165 8.0; imagenet/r34_r18/dkd.yaml 0.5",
                "the pair table for the CIFAR zoo's names; 8 for any other pair (ImageNet's 0.5 is not applied)",
                ours="by pair: 2, 6 or 8, else 8 (×9 with --logit-standardize)"),
        Setting("dkd_warmup", "—",
                f"{_CFG}:167: WARMUP 20 of 240, distillers/DKD.py:72: min(epoch / warmup, 1), epoch from 1; "
                "imagenet/r34_r18/dkd.yaml: WARMUP 1", "both: 20/240 of training, one epoch with 1,000 classes",
                ours="20/240 (one epoch with 1,000 classes)"),
        Setting("temperature", "—",
                f"{_CFG}:166: T 4.0; imagenet/r34_r18/dkd.yaml: T 1.0; {_LS}: 2 with --logit-stand",
                "4 (2 with --logit-standardize); --temperature 1 for ImageNet's", ours="4; 2 with --logit-standardize"),
    ),
    params=(
        Param("dkd_alpha", float, None, "weight alpha of the target-class term TCKD (default: 1; 9 with "
              "--logit-standardize)", cite=f"{_CFG}: CFG.DKD.ALPHA 1.0; {_LS}: ×9 with logit standardisation",
              range=at_least(0.0), allowed="a weight >= 0 (or unset: the authors')", space=uniform(0.0, 2.0),
              optional=True),
        Param("dkd_beta", float, None, "weight beta of the non-target-class term NCKD (default: the authors' for the "
              "teacher-student pair, 2, 6 or 8, else 8; times 9 with --logit-standardize)",
              cite=f"{_MDISTILLER}/<pair>.yaml: BETA (paper table 8); {_CFG}: 8.0 otherwise; {_LS}: ×9",
              range=at_least(0.0), allowed="a weight >= 0 (or unset: the authors')", space=log_uniform(0.5, 16.0),
              optional=True),
        Param("dkd_warmup", float, None, "share of training over which the DKD term rises linearly from 0, counted "
              "in whole epochs from 1 (default: 20/240; one epoch with 1,000 classes, as on ImageNet)",
              cite=f"{_MDISTILLER}/*.yaml: WARMUP 20 of 240 epochs; configs/imagenet/r34_r18/dkd.yaml: WARMUP 1",
              range=share(), allowed="a share of training in [0, 1) (or unset: the authors')", optional=True),
        LOGIT_STANDARDIZE,
    ))


def dkd_beta_for(teacher: str | None, student: str | None) -> float:
    """The authors' β for a teacher–student pair of the CIFAR zoo (:data:`BETA_BY_PAIR`), else 8."""
    return BETA_BY_PAIR.get((teacher or "", student or ""), DEFAULT_BETA)


def dkd_settings(cfg: Config, num_classes: int) -> tuple[float, float, float]:
    """``(α, β, warm-up share)`` of a resolved config: the user's values, else the authors' (docstring of SPEC)."""
    archs = set(student_archs(cfg, student_count(cfg) or 1))
    student = archs.pop() if len(archs) == 1 else None
    scale = LS_KD_WEIGHT if cfg.logit_standardize else 1.0
    alpha = cfg.dkd_alpha if cfg.dkd_alpha is not None else scale * 1.0
    beta = cfg.dkd_beta if cfg.dkd_beta is not None else scale * dkd_beta_for(cfg.teacher_arch, student)
    if cfg.dkd_warmup is not None:
        warmup = cfg.dkd_warmup
    else:  # one epoch on ImageNet (mdistiller's imagenet configs), 20 of 240 epochs elsewhere
        warmup = 1.0 / max(cfg.epochs, 1) if num_classes == 1000 else 20 / 240
    return alpha, beta, warmup


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

    mdistiller calls it with the 1-based epoch and ``warmup = 20``: the first epoch already weighs 1/20 (pass
    :func:`~distillistic.core.objective.epoch_progress` as ``progress`` and a share as ``warmup``).
    """
    if warmup <= 0:
        return 1.0
    return min(max(progress, 0.0) / warmup, 1.0)


class DKDTerm(TeacherLogitTerm):
    """``min(e / (w·E), 1)·T²·(α·TCKD + β·NCKD)`` (Zhao et al. 2022, eq. 7; :func:`dkd_loss`), ``e`` the 1-based
    epoch of ``E`` (:func:`~distillistic.core.objective.epoch_progress`), as mdistiller's ``DKD.forward_train``."""

    def __init__(self, teacher: LogitSource, alpha: float, beta: float, temperature: float, warmup: float,
                 standardize: bool, epochs: int = 0) -> None:
        super().__init__("dkd", teacher, temperature, standardize,
                         lambda p: linear_warmup(epoch_progress(p, epochs), warmup))
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return dkd_loss(zs, ts, inp.labels, self.alpha, self.beta, self.temperature)["loss"]

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        warm = f"min(e/{self.warmup:.3g}, 1)·" if self.warmup > 0 else ""
        return (f"{warm}{t}²·({self.alpha:g}·TCKD + {self.beta:g}·NCKD)(softmax(t/{t}) ‖ softmax(z/{t}))"
                f"{self._suffix()}")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    teacher = logit_source(ctx.teacher, "dkd")
    alpha, beta, warmup = dkd_settings(cfg, ctx.num_classes)
    return (DKDTerm(teacher, alpha, beta, cfg.temperature, warmup, cfg.logit_standardize, cfg.epochs),)


register_method(SPEC, terms, temperature=lambda cfg: LS_TEMPERATURE if cfg.logit_standardize else SPEC.temperature)
