"""The feature-distillation methods: ``fitnet``, ``at``, ``rkd``, ``sp``, ``crd`` (registered into METHODS).

Each composes as a sum (RepDistiller's ``-r 1 -a <kd> -b <beta>``): ``L = CE + β·feature term``, plus
``feature_kd · T²·KL(softmax(t/T) ‖ softmax(z/T))`` when ``--feature-kd`` is above 0 (T defaults to 4, as
RepDistiller). β defaults to the paper's (RepDistiller's) weight per method; ``--feature-weight`` overrides
it. Stages are named ``stage1 .. stageN`` and ``embedding`` (:mod:`distillistic.models.stages`).
"""

from __future__ import annotations

import logging

from distillistic.config import Config
from distillistic.core.features import Attention, Contrastive, FeatureProbe, FitNet, Relational, Similarity
from distillistic.core.methods import Context, method
from distillistic.core.objective import Distill, Term
from distillistic.core.signals import Teacher
from distillistic.errors import UserError

log = logging.getLogger("distillistic")

PAPER_WEIGHTS = {"fitnet": 100.0, "at": 1000.0, "rkd": 1.0, "sp": 3000.0, "crd": 0.8}
COMMON = ("feature_weight", "feature_kd")
OPTIONS: dict[str, object] = dict(family="teacher", needs_teacher=True, default_teacher="resnet50",
                                  default_temperature=lambda cfg: 4.0, composition="sum", weights=COMMON)


def _weight(cfg: Config, name: str) -> float:
    return cfg.feature_weight if cfg.feature_weight is not None else PAPER_WEIGHTS[name]


def _parts(ctx: Context, name: str) -> tuple[Teacher, FeatureProbe]:
    """The live teacher and the probe of the run's models, which every feature method needs."""
    if not isinstance(ctx.teacher, Teacher) or ctx.probe is None:
        raise UserError(f"algo {name} distils features: it needs one frozen teacher model and the run's models "
                        "(train it with 'distillistic train' or distillistic.train)")
    return ctx.teacher, ctx.probe


class _AddedKD(Distill):
    """Hinton's KD as an added term of a sum: the sum prints its weight, so :meth:`describe` leaves it out."""

    def describe(self) -> str:
        weight, self.weight = self.weight, 1.0
        try:
            return super().describe()
        finally:
            self.weight = weight


def _with_kd(cfg: Config, ctx: Context, term: Term) -> tuple[Term, ...]:
    """``term``, and a KD term of weight ``feature_kd`` when it is above 0."""
    if cfg.feature_kd <= 0:
        return (term,)
    assert ctx.teacher is not None
    assert cfg.temperature is not None
    return term, _AddedKD("kd", ctx.teacher, cfg.divergence, cfg.temperature, weight=cfg.feature_kd)


def _spatial(stages: tuple[str, ...]) -> list[str]:
    return [s for s in stages if s != "embedding"]


@method("fitnet", "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)", params=(*COMMON, "hint_stage"),
        **OPTIONS)
def _fitnet(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + β mean((r(F_s) - F_t)²) on hint_stage, r a trained 1x1 conv + BN (β = 100) [+ w T² KL]"""
    teacher, probe = _parts(ctx, "fitnet")
    stage = cfg.hint_stage
    t_shape = probe.shapes("teacher", (stage,))[stage]
    s_shapes = [probe.shapes("student", (stage,), i)[stage] for i in range(ctx.students)]
    return _with_kd(cfg, ctx, FitNet(teacher, stage, stage, _weight(cfg, "fitnet"), s_shapes, t_shape))


@method("at", "Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR)", params=(*COMMON, "at_stages"),
        **OPTIONS)
def _at(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + β sum_stages mean((a_s - a_t)²), a = normalize(mean_c F²) (β = 1000) [+ w T² KL]"""
    teacher, probe = _parts(ctx, "at")
    stages = list(cfg.at_stages)
    if not stages:
        theirs = probe.stages("teacher")
        stages = [s for s in _spatial(probe.stages("student")) if s in theirs]
        if not stages:
            raise UserError(f"algo at: the student '{cfg.model}' and the teacher '{cfg.teacher}' share no spatial "
                            f"stage (student: {', '.join(probe.stages('student'))}; teacher: {', '.join(theirs)}); "
                            "choose models with stages")
    probe.shapes("teacher", stages)  # an unknown name is refused here, with the model's stages
    probe.shapes("student", stages)
    return _with_kd(cfg, ctx, Attention(teacher, stages, _weight(cfg, "at")))


def _last(probe: FeatureProbe, role: str) -> str:
    stages = probe.stages(role)  # type: ignore[arg-type]
    return (_spatial(stages) or ["embedding"])[-1]


@method("sp", "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)", params=(*COMMON, "sp_stage"),
        **OPTIONS)
def _sp(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + γ ||G_s - G_t||²_F / B², G the normalised batch Gram of sp_stage (γ = 3000) [+ w T² KL]"""
    teacher, probe = _parts(ctx, "sp")
    s_stage = _last(probe, "student") if cfg.sp_stage == "last" else cfg.sp_stage
    t_stage = _last(probe, "teacher") if cfg.sp_stage == "last" else cfg.sp_stage
    probe.shapes("teacher", (t_stage,))
    probe.shapes("student", (s_stage,))
    return _with_kd(cfg, ctx, Similarity(teacher, s_stage, t_stage, _weight(cfg, "sp")))


@method("rkd", "Park et al. 2019, Relational Knowledge Distillation (CVPR)", params=(*COMMON, "rkd_distance",
        "rkd_angle"), **OPTIONS)
def _rkd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + β (25 Huber(ψ_D(s), ψ_D(t)) + 50 Huber(ψ_A(s), ψ_A(t))) on the embeddings (β = 1) [+ w T² KL]"""
    teacher, probe = _parts(ctx, "rkd")
    probe.shapes("teacher", ("embedding",))
    probe.shapes("student", ("embedding",))
    return _with_kd(cfg, ctx, Relational(teacher, _weight(cfg, "rkd"), cfg.rkd_distance, cfg.rkd_angle))


@method("crd", "Tian, Krishnan & Isola 2020, Contrastive Representation Distillation (ICLR)",
        params=(*COMMON, "crd_negatives", "crd_temperature", "crd_momentum", "crd_dim"), **OPTIONS)
def _crd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y) + β [NCE(g_s(e_s); bank_t) + NCE(g_t(e_t); bank_s)], K negatives, τ = 0.07 (β = 0.8) [+ w T² KL]"""
    teacher, probe = _parts(ctx, "crd")
    dim_t = probe.shapes("teacher", ("embedding",))["embedding"][1]
    dim_s = [probe.shapes("student", ("embedding",), i)["embedding"][1] for i in range(ctx.students)]
    k = min(cfg.crd_negatives, max(1, probe.n_data - 1))
    if k < cfg.crd_negatives:
        log.info("crd: %d negatives instead of %d (the training split holds %d samples)", k, cfg.crd_negatives,
                 probe.n_data)
    term = Contrastive(teacher, _weight(cfg, "crd"), dim_s, dim_t, probe.n_data, cfg.crd_dim, k,
                       cfg.crd_temperature, cfg.crd_momentum, cfg.seed)
    return _with_kd(cfg, ctx, term)
