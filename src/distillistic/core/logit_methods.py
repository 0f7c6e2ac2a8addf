"""The modern logit-based methods (issue 10): ls, dkd, dist, ctkd, kdcl, tfkd_self, registered into METHODS.

Each method is a registered function returning its terms (see :mod:`distillistic.core.methods`); the loss
arithmetic lives in :mod:`distillistic.core.logit_losses` (tested there against the authors' code). Notation:
student logits ``z`` ``[B, K]``, frozen teacher logits ``t`` ``[B, K]``, labels ``y`` ``[B]``, progress ``p`` in
[0, 1] of training. ``--logit-standardize`` (Sun et al. 2024) z-scores ``t`` (or the peers' logits) and ``z`` per
sample before the temperature in every method here that has such a signal (dkd, dist, ctkd, kdcl), as
:class:`~distillistic.core.objective.Distill` does for kd, dml and dml_e.

KDCL's students read differently augmented copies of the same images (Guo et al. 2020, sec. 3.1): with
``--peer-views independent`` (any cohort method: dml, dml_e, kdcl, pcl) student ``m`` reads its own augmented
view of each sample, keyed by ``(data_seed, epoch, index, m)`` (:mod:`distillistic.data.views`), and
:class:`MinLogit`'s target is computed per sample from the logits each student gave on its own view. By
default (``shared``) the cohort shares one augmented view.

Imported by ``distillistic/core/__init__.py``, so that :data:`METHODS` is complete whoever imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from distillistic.config import Config, student_archs
from distillistic.core.logit_losses import (
    LearnableTemperature,
    cosine_lambda,
    dist_loss,
    dkd_loss,
    kd_loss,
    kdcl_min_logit_target,
    label_smoothing_cross_entropy,
    linear_warmup,
    standardize,
)
from distillistic.core.methods import Context, method
from distillistic.core.objective import Distill, Ramp, Term, constant
from distillistic.core.signals import Signal, StepInputs, Transform
from distillistic.errors import ConfigError, UserError


class LogitSource(Protocol):
    """A teacher signal whose raw logits ``[B, K]`` can be read (:class:`~distillistic.core.signals.Teacher`)."""

    def logits(self, inp: StepInputs) -> Tensor: ...


def _logit_source(signal: Signal | None, algo: str) -> LogitSource:
    if signal is None or not callable(getattr(signal, "logits", None)):
        raise UserError(f"algo {algo} needs one frozen teacher whose logits can be read; use --algo kd for this "
                        "teacher signal")
    return signal  # type: ignore[return-value]


def _t(cfg: Config) -> float:
    assert cfg.temperature is not None, "resolve the config first"
    return cfg.temperature


class LabelSmoothingCE(Term):
    """``CE((1 − ε)·onehot(y) + ε/K, softmax(z))`` (Szegedy et al. 2016): the supervised term of ``ls``.

    At ``ε = 0`` it runs PyTorch's plain cross-entropy path: bit for bit the baseline's term.
    """

    def __init__(self, eps: float) -> None:
        super().__init__("ce", 1.0, distil=False)
        self.eps = eps

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        return label_smoothing_cross_entropy(z, inp.labels, self.eps)

    def describe(self) -> str:
        return f"CE((1-{self.eps:g})·onehot(y) + {self.eps:g}/K, softmax(z))"


class TeacherLogitTerm(Term):
    """A term computed from the frozen teacher's raw logits ``t`` ``[B, K]`` and the student's ``z`` ``[B, K]``.

    Its monitored target (entropy, ECE in the training rows) is ``softmax(t/T)`` (z-scored ``t`` if standardised).
    """

    def __init__(self, name: str, teacher: LogitSource, temperature: float, standardize: bool,
                 ramp: Ramp = constant) -> None:
        super().__init__(name, 1.0, distil=True, ramp=ramp)
        self.teacher, self.temperature, self.standardize = teacher, temperature, standardize

    def pair(self, z: Tensor, inp: StepInputs) -> tuple[Tensor, Tensor]:
        """``(z, t)``, both z-scored per sample when standardising."""
        t = self.teacher.logits(inp)
        return (standardize(z), standardize(t)) if self.standardize else (z, t)

    def targets(self, inp: StepInputs) -> list[Tensor]:
        t = self.teacher.logits(inp)
        q = torch.softmax((standardize(t) if self.standardize else t.float()) / self.temperature, dim=-1)
        return [q.unsqueeze(0)] * len(inp.logits)

    def _suffix(self) -> str:
        return " on z-scored logits" if self.standardize else ""


class DKDTerm(TeacherLogitTerm):
    """``min(p / w, 1)·T²·(α·TCKD + β·NCKD)`` (Zhao et al. 2022, eq. 7; :func:`logit_losses.dkd_loss`)."""

    def __init__(self, teacher: LogitSource, alpha: float, beta: float, temperature: float, warmup: float,
                 standardize: bool) -> None:
        super().__init__("dkd", teacher, temperature, standardize, functools.partial(linear_warmup, warmup=warmup))
        self.alpha, self.beta, self.warmup = alpha, beta, warmup

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        zs, ts = self.pair(z, inp)
        return dkd_loss(zs, ts, inp.labels, self.alpha, self.beta, self.temperature)["loss"]

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        warm = f"min(p/{self.warmup:.3g}, 1)·" if self.warmup > 0 else ""
        return (f"{warm}{t}²·({self.alpha:g}·TCKD + {self.beta:g}·NCKD)(softmax(t/{t}) ‖ softmax(z/{t}))"
                f"{self._suffix()}")


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


class CTKDTerm(TeacherLogitTerm):
    """``T_i²·KL(softmax(t/T_i) ‖ softmax(z/T_i))`` with ``T_i = 1 + 20·sigmoid(θ_i)`` learned adversarially.

    Li et al. 2023 (CTKD, global temperature): θ_i gets the gradient reversed and scaled by ``λ(p)``, a cosine
    ramp from 0 to 1 over the first ``ramp`` share of training (:func:`logit_losses.cosine_lambda`). Each
    student ``i`` has its own θ_i, trained by its optimizer (:meth:`student_parameters`) and checkpointed with
    the objective; its temperature is logged per epoch (:meth:`stats`).
    """

    def __init__(self, teacher: LogitSource, students: int, ramp: float, standardize: bool) -> None:
        super().__init__("ctkd", teacher, 1.0, standardize)
        self.ramp_share = ramp
        self.temperatures = nn.ModuleList(LearnableTemperature() for _ in range(students))

    def current(self, i: int) -> Tensor:
        """Student ``i``'s temperature, a detached 0-d tensor."""
        return self.temperatures[i](0.0).detach()

    def targets(self, inp: StepInputs) -> list[Tensor]:
        t = self.teacher.logits(inp)
        t = standardize(t) if self.standardize else t.float()
        return [torch.softmax(t / self.current(i), dim=-1).unsqueeze(0) for i in range(len(inp.logits))]

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        temperature = self.temperatures[i](cosine_lambda(inp.progress, 1.0, 0.0, self.ramp_share))
        zs, ts = self.pair(z, inp)
        return kd_loss(zs, ts, temperature)

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.temperatures[i].parameters()

    def stats(self, i: int) -> dict[str, float]:
        return {"ctkd_temperature": float(self.current(i))}

    def describe(self) -> str:
        return ("T²·KL(softmax(t/T) ‖ softmax(z/T)), T = 1 + 20·sigmoid(θ), θ trained through gradient reversal "
                f"(λ: cosine 0 → 1 over the first {self.ramp_share:.3g} of training){self._suffix()}")


class MinLogit:
    """KDCL-MinLogit's ensemble target (Guo et al. 2020, sec. 3.2), shared by every member of the cohort:
    ``softmax(min_m (z^m − z^m_y) / T)`` from the members' detached logits (each on its own view of the sample
    with ``--peer-views independent``)."""

    pairwise = False

    def __init__(self, name: str = "kdcl") -> None:
        self.name = name

    def targets(self, inp: StepInputs, temperature: float) -> list[Tensor]:
        return self._targets(inp, temperature, None)

    def standardized_targets(self, inp: StepInputs, temperature: float) -> list[Tensor]:
        """The members' logits z-scored per sample before the min and the temperature (Sun et al. 2024)."""
        return self._targets(inp, temperature, standardize)

    def _targets(self, inp: StepInputs, temperature: float, transform: Transform) -> list[Tensor]:
        if len(inp.logits) < 2:
            raise ValueError("KDCL needs a cohort of at least 2 students")
        z = torch.stack([z.detach().float() for z in inp.logits])
        q = kdcl_min_logit_target(transform(z) if transform else z, inp.labels, temperature)
        return [q.unsqueeze(0)] * len(inp.logits)

    def describe(self, temperature: float) -> str:
        t = "" if temperature == 1 else f"/{temperature:g}"
        return f"softmax(min_m (z_m - z_m,y){t})"


# --- the methods ---------------------------------------------------------------------------------------------


@method("ls", "Szegedy et al. 2016, Rethinking the Inception Architecture (CVPR): label smoothing",
        family="supervised", params=("label_smoothing",), supervised=lambda cfg: LabelSmoothingCE(cfg.label_smoothing))
def _ls(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE((1-ε) onehot(y) + ε/K, softmax(z)); ε = 0 is the baseline"""
    return ()


_TEACHER = {"family": "teacher", "needs_teacher": True, "default_teacher": "resnet50"}


@method("dkd", "Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)", composition="sum",
        weights=("dkd_alpha", "dkd_beta", "dkd_warmup"),
        params=("dkd_alpha", "dkd_beta", "dkd_warmup", "logit_standardize"), default_temperature=lambda cfg: 4.0,
        **_TEACHER)
def _dkd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + min(p/w, 1) T² (α TCKD + β NCKD); TCKD on [p_y, 1-p_y], NCKD on the non-target classes"""
    teacher = _logit_source(ctx.teacher, "dkd")
    return (DKDTerm(teacher, cfg.dkd_alpha, cfg.dkd_beta, _t(cfg), cfg.dkd_warmup, cfg.logit_standardize),)


@method("dist", "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS): DIST",
        composition="sum", params=("dist_beta", "dist_gamma", "logit_standardize"), weights=("dist_beta", "dist_gamma"),
        default_temperature=lambda cfg: 4.0, **_TEACHER)
def _dist(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + τ² (β (1 - mean_b pearson_K) + γ (1 - mean_k pearson_B)) of softmax(z/τ), softmax(t/τ)"""
    teacher = _logit_source(ctx.teacher, "dist")
    return (DISTTerm(teacher, cfg.dist_beta, cfg.dist_gamma, _t(cfg), cfg.logit_standardize),)


def _learned_temperature_check(cfg: Config, num_classes: int) -> None:
    if cfg.temperature not in (None, 1.0):
        raise ConfigError("temperature", cfg.temperature, "unset for ctkd (its temperature is learned: "
                                                          "1 + 20·sigmoid(θ))")


@method("ctkd", "Li et al. 2023, Curriculum Temperature for Knowledge Distillation (AAAI): global temperature",
        params=("ctkd_ramp", "logit_standardize"), data_check=_learned_temperature_check, **_TEACHER)
def _ctkd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)), T = 1 + 20 sigmoid(θ), θ by reversed gradient"""
    teacher = _logit_source(ctx.teacher, "ctkd")
    return (CTKDTerm(teacher, ctx.students, cfg.ctkd_ramp, cfg.logit_standardize),)


@method("kdcl", "Guo et al. 2020, Online Knowledge Distillation via Collaborative Learning (CVPR): KDCL-MinLogit",
        family="cohort", min_students=2, default_students=2, params=("logit_standardize",))
def _kdcl(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L_m = (1-a) CE(z_m, y) + a T² KL(softmax(min_j (z_j - z_j,y)/T) ‖ softmax(z_m/T)), target detached; --peer-views independent: z_j on student j's own augmented view"""  # noqa: E501
    return (Distill("kdcl", MinLogit(), cfg.divergence, _t(cfg), standardize=cfg.logit_standardize),)


def _own_architecture(cfg: Config, num_classes: int) -> None:
    """Self-training teaches each student by its own architecture: a teacher of another one would silently make
    this KD, so every student (``--students`` as a list, else ``--model``) must be the teacher's architecture."""
    archs = sorted(set(student_archs(cfg, 1)))
    if len(archs) > 1:
        raise UserError(f"tfkd_self teaches each student by its own architecture, but the students are "
                        f"{', '.join(archs)} and one run has one teacher; run tfkd_self once per architecture, "
                        "or use --algo kd")
    if cfg.teacher != archs[0]:
        raise UserError(f"tfkd_self is taught by the student's own architecture ('{archs[0]}'), not by "
                        f"'{cfg.teacher}'; leave --teacher out (or set it to {archs[0]}), or use --algo kd")


@method("tfkd_self", "Yuan et al. 2020, Revisiting KD via Label Smoothing Regularization (CVPR): self-training",
        family="self", needs_teacher=True, default_teacher=lambda cfg: student_archs(cfg, 1)[0],
        default_temperature=lambda cfg: 20.0, data_check=_own_architecture)
def _tfkd_self(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)), t: the student's architecture trained first"""
    assert ctx.teacher is not None
    return (Distill("tfkd_self", ctx.teacher, cfg.divergence, _t(cfg)),)
