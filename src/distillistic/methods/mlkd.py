"""Multi-level logit distillation (Jin, Wang & Lin 2023, CVPR): instance, batch and class-level alignment of the
student's and the teacher's predictions at five temperatures, on a weak and a strongly augmented view.

For student logits ``z_w``, ``z_s`` and teacher logits ``t_w``, ``t_s`` on the weak and the strong view, with
``P = softmax(·/τ)`` ``[B, K]``, ``KD_τ`` the batch-mean ``τ²·KL``, ``CC_τ = ‖P_tᵀP_t − P_sᵀP_s‖²/K`` (class
correlation) and ``BC_τ = ‖P_t P_tᵀ − P_s P_sᵀ‖²/B`` (batch correlation)::

    L = c·(CE(z_w, y) + CE(z_s, y)) + d·Σ_τ [m·KD_τ(w) + c_m·CC_τ(w) + m·BC_τ(w)] + d·Σ_(τ∈T,3,5) KD_τ(s)
        + d·Σ_(τ∈2,6) KD_τ(w)

over ``τ ∈ {T, 3, 5, 2, 6}`` (T = 4), ``c = 0.1``, ``d = 0.9``; ``m`` is the share of samples whose teacher
confidence on the weak view is at most the batch median, ``c_m`` the share of classes whose summed teacher
probability is at most the median over classes. This is the authors' code (``KD_ours.forward_train``), which
differs from the paper in three places, followed here: the masks multiply the batch-mean losses (``(loss *
mask).mean()`` with a scalar loss: a factor of about 0.5, not a selection of samples); the strong-view KD's
τ = 2 and 6 terms read the weak view; the strong view's CC and BC are computed and left out of the loss.

The views (reference: ``mdistiller/dataset/cifar100.py``, ``get_cifar100_train_transform_strong``): the weak view
is the run's own training view (``--augment``; ``cifar`` is the reference's crop + flip); the strong view is made
by the run's views (:meth:`distillistic.data.views.ViewMaker.strong_views`, asked for by ``strong_view``): the
run's augmentation drawn on keys of its own (its own crop and flip with ``cifar``, as the reference's), then
RandAugment with 2 operations at magnitude 10 of 31 bins. The reference's RandAugment(2, 10) has its own
operation list (with Cutout) and magnitude scale; here it is torchvision's operations, batched
(:class:`~distillistic.data.augment.BatchRandAugment`). The student runs a second forward on the strong view and
the teacher a live one (the teacher-output store keeps the weak view's logits).
Reference: Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.objective import CrossEntropy, Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, model_view
from distillistic.core.teacher_logits import LogitSource, TeacherLogitTerm, logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import MethodSpec, Param, Setting, at_least, log_uniform, uniform

_REPO = "Jin-Ying/Multi-Level-Logit-Distillation @5ee473f"
SPEC = MethodSpec(
    "mlkd", "Jin, Wang & Lin 2023, Multi-Level Logit Distillation (CVPR)",
    "L = c (CE(z_w, y) + CE(z_s, y)) + d Σ_τ [KD_τ + CC_τ + BC_τ] on a weak and a strong view, τ ∈ {T, 3, 5, 2, 6}, "
    "teacher-confidence masks (the authors' code)",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0, composition="sum",
    weights=("mlkd_ce_weight", "mlkd_kd_weight"), reads=("temperature",),
    notes=f"T = 4, CE weight 0.1, KD weight 0.9: {_REPO}, mdistiller/engine/cfg.py lines 61-64 (the CIFAR-100 "
          "configs/cifar100/ours/*.yaml set none of them); the extra temperatures 2, 3, 5, 6 are fixed in "
          "KD_ours.py lines 115-162",
    defaults=(
        Setting("mlkd_ce_weight", "—", f"{_REPO}, mdistiller/engine/cfg.py:63 CE_WEIGHT 0.1 (configs/cifar100/ours/"
                "*.yaml set none)"),
        Setting("mlkd_kd_weight", "—", f"{_REPO}, mdistiller/engine/cfg.py:64 KD_WEIGHT 0.9"),
        Setting("temperature", "—", f"{_REPO}, mdistiller/engine/cfg.py:61 TEMPERATURE 4, and 3, 5, 2, 6 fixed in "
                "mdistiller/distillers/KD_ours.py:115-162", "the code, with its masks and views (module docstring)",
                ours="4 (and 3, 5, 2, 6)"),
    ),
    params=(
        Param("mlkd_ce_weight", float, 0.1, "weight c of the two cross-entropies (weak and strong view)",
              cite=f"{_REPO}, mdistiller/engine/cfg.py line 63: CFG.KD.LOSS.CE_WEIGHT = 0.1", range=at_least(0.0),
              allowed="a weight >= 0", space=uniform(0.05, 1.0)),
        Param("mlkd_kd_weight", float, 0.9, "weight d of every KD, class- and batch-correlation term",
              cite=f"{_REPO}, mdistiller/engine/cfg.py line 64: CFG.KD.LOSS.KD_WEIGHT = 0.9", range=at_least(0.0),
              allowed="a weight >= 0", space=log_uniform(0.1, 4.0)),
    ))

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # KD_ours.py: after self.temperature, in the reference's order


def _kd(zs: Tensor, zt: Tensor, tau: float) -> Tensor:
    """``τ²·mean_b KL(softmax(zt/τ) ‖ softmax(zs/τ))`` (the reference's ``kd_loss``)."""
    log_p = F.log_softmax(zs / tau, dim=1)
    log_q = F.log_softmax(zt / tau, dim=1)
    q = log_q.exp()
    return tau**2 * torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=1).mean()


def _correlation(zs: Tensor, zt: Tensor, tau: float, classes: bool) -> Tensor:
    """``‖G_t − G_s‖²/n`` of the Gram matrices of ``softmax(·/τ)``: class (``PᵀP``, ``n = K``) or batch (``PPᵀ``,
    ``n = B``)."""
    ps, pt = F.softmax(zs / tau, dim=1), F.softmax(zt / tau, dim=1)
    gs, gt = (ps.t() @ ps, pt.t() @ pt) if classes else (ps @ ps.t(), pt @ pt.t())
    return ((gt - gs) ** 2).sum() / zs.shape[1 if classes else 0]


def _share_at_most_median(x: Tensor) -> Tensor:
    """The share of ``x`` ``[N]`` at most its median (``np.percentile(x, 50)``, linear interpolation)."""
    return (x <= torch.quantile(x, 0.5)).to(x.dtype).mean()


def mlkd_loss(z_w: Tensor, z_s: Tensor, t_w: Tensor, t_s: Tensor, y: Tensor, temperature: float = 4.0,
              ce_weight: float = 0.1, kd_weight: float = 0.9) -> dict[str, Tensor]:
    """MLKD as the authors' ``KD_ours.forward_train``: ``{"kd", "cc", "bc", "term", "loss"}``, each a scalar.

    ``z_w``, ``z_s``: student logits ``[B, K]`` on the weak and strong views; ``t_w``, ``t_s``: the teacher's
    (detached); ``y``: labels ``[B]``. ``kd``, ``cc``, ``bc``: the reference's ``loss_kd``, ``loss_cc``,
    ``loss_bc`` (weighted by ``kd_weight``); ``loss`` = ``ce_weight·(CE(z_w) + CE(z_s)) + kd + cc + bc`` (their
    sum); ``term`` = ``loss`` without ``ce_weight·CE(z_w, y)`` (what the objective adds to its own CE).
    """
    z_w, z_s = at_least_float32(z_w), at_least_float32(z_s)
    t_w, t_s = at_least_float32(t_w.detach()), at_least_float32(t_s.detach())
    q_w = F.softmax(t_w, dim=1)
    m = _share_at_most_median(q_w.max(dim=1).values)
    c_m = _share_at_most_median(q_w.sum(dim=0))
    taus = (temperature, *EXTRA_TEMPERATURES)
    kd_weak = sum(_kd(z_w, t_w, tau) for tau in taus) * m
    kd_strong = sum(_kd(z_s, t_s, tau) for tau in taus[:3]) + sum(_kd(z_w, t_w, tau) for tau in taus[3:])
    cc = kd_weight * c_m * sum(_correlation(z_w, t_w, tau, classes=True) for tau in taus)
    bc = kd_weight * m * sum(_correlation(z_w, t_w, tau, classes=False) for tau in taus)
    kd = kd_weight * (kd_weak + kd_strong)
    term = ce_weight * F.cross_entropy(z_s, y) + kd + cc + bc
    return {"kd": kd, "cc": cc, "bc": bc, "term": term, "loss": ce_weight * F.cross_entropy(z_w, y) + term}


class MLKDTerm(TeacherLogitTerm):
    """MLKD beside the objective's ``c·CE(z_w, y)``: the strong view's forwards and :func:`mlkd_loss`."""

    strong_view = True  # the run's views make a strongly augmented view of every batch (inp.strong_views)

    def __init__(self, teacher: LogitSource, temperature: float, ce_weight: float, kd_weight: float) -> None:
        super().__init__("mlkd", teacher, temperature, False)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self._students: list[nn.Module] = []
        self._views: list[tuple[Any, ...]] = []

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        self._students, self._views = list(students), list(views)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        strong = inp.strong_views
        assert strong is not None, "the run's views make the strong view (strong_view)"
        size, channels, norm = self._views[i]
        z_s = self._students[i](model_view(strong, size, channels, norm))
        t = self.teacher
        t_s = t.forward_on(strong)  # type: ignore[attr-defined]  # the teacher on the strong view, t / T_cal
        out = mlkd_loss(z, z_s, t.logits(inp), t_s, inp.labels, self.temperature, self.ce_weight, self.kd_weight)
        return out["term"]

    def describe(self) -> str:
        t, d = f"{self.temperature:g}", f"{self.kd_weight:g}"
        return (f"{self.ce_weight:g}·CE(z_s, y) + {d}·Σ_τ[m·KD_τ + c_m·CC_τ + m·BC_τ](z_w, t_w) "
                f"+ {d}·Σ_(τ∈{t},3,5) KD_τ(z_s, t_s) + {d}·Σ_(τ∈2,6) KD_τ(z_w, t_w), τ ∈ {{{t}, 3, 5, 2, 6}}; "
                "z_s, t_s on RandAugment(2, 10) of the view")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    teacher = logit_source(ctx.teacher, "mlkd")
    return (MLKDTerm(teacher, cfg.temperature, cfg.mlkd_ce_weight, cfg.mlkd_kd_weight),)


def supervised(cfg: Config) -> Term:
    """The weak view's ``c·CE(z_w, y)`` (the strong view's is in the MLKD term)."""
    return CrossEntropy(cfg.mlkd_ce_weight)


register_method(SPEC, terms, supervised=supervised)
