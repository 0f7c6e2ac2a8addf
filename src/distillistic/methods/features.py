"""What the feature-distillation methods share (fitnet, at, sp, rkd, crd): their spec options and helpers.

Each composes as a sum (RepDistiller's ``-r 1 -a <kd> -b <beta>``): ``L = CE + β·feature term``, plus
``feature_kd · T²·KL(softmax(t/T) ‖ softmax(z/T))`` when ``--feature-kd`` is above 0 (T defaults to 4, as
RepDistiller). β defaults to the paper's (RepDistiller's) weight per method; ``--feature-weight`` overrides
it. Stages are named ``stage1 .. stageN`` and ``embedding`` (:mod:`distillistic.models.stages`).
"""

from __future__ import annotations

from distillistic.config import Config
from distillistic.core.features import FeatureProbe
from distillistic.core.objective import Distill, Term
from distillistic.core.signals import Teacher
from distillistic.errors import UserError
from distillistic.methods.registry import Context


def weight(cfg: Config, paper: float) -> float:
    """``--feature-weight`` if set, else the paper's weight of the method."""
    return cfg.feature_weight if cfg.feature_weight is not None else paper


def parts(ctx: Context, name: str) -> tuple[Teacher, FeatureProbe]:
    """The live teacher and the probe of the run's models, which every feature method needs."""
    if not isinstance(ctx.teacher, Teacher) or ctx.probe is None:
        raise UserError(f"algo {name} distils features: it needs one frozen teacher model and the run's models "
                        "(train it with 'distillistic train' or distillistic.train)")
    return ctx.teacher, ctx.probe


class AddedKD(Distill):
    """Hinton's KD as an added term of a sum: the sum prints its weight, so :meth:`describe` leaves it out."""

    def describe(self) -> str:
        weight, self.weight = self.weight, 1.0
        try:
            return super().describe()
        finally:
            self.weight = weight


def with_kd(cfg: Config, ctx: Context, term: Term) -> tuple[Term, ...]:
    """``term``, and a KD term of weight ``feature_kd`` when it is above 0."""
    if cfg.feature_kd <= 0:
        return (term,)
    assert ctx.teacher is not None
    assert cfg.temperature is not None
    return term, AddedKD("kd", ctx.teacher, cfg.divergence, cfg.temperature, weight=cfg.feature_kd)


def spatial(stages: tuple[str, ...]) -> list[str]:
    return [s for s in stages if s != "embedding"]


def last_stage(probe: FeatureProbe, role: str) -> str:
    stages = probe.stages(role)  # type: ignore[arg-type]
    return (spatial(stages) or ["embedding"])[-1]


def last_spatial_stages(probe: FeatureProbe, cfg: Config, algo: str, needs: str) -> tuple[str, str]:
    """The student's and the teacher's last spatial stage; one line refusing a model that has none (an MLP's
    embedding only), ``needs`` saying what the method reads there."""
    stages = last_stage(probe, "student"), last_stage(probe, "teacher")
    for role, stage, arch in (("student", stages[0], cfg.model), ("teacher", stages[1], cfg.teacher_arch)):
        if stage == "embedding":
            raise UserError(f"algo {algo} {needs}, which the {role} '{arch}' has not (no spatial stage); choose a "
                            "model with stages (cnn, resnet18, ...)")
    return stages
