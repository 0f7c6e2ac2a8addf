"""Registered algorithms: each is its students, teaching signals, divergence and weight.

A method never touches the training loop. It says how many students it needs, whether it needs a
frozen teacher, its default temperature, and which :class:`~distillistic.objective.Term` s to add
to the cross-entropy. Adding an algorithm is one decorated function below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Config
from .errors import ConfigError
from .objective import Objective, Term
from .registry import Registry
from .signals import Peers, Teacher, Virtual

TermsBuilder = Callable[[Config, Teacher | None], tuple[Term, ...]]


@dataclass(frozen=True)
class Method:
    name: str
    terms: TermsBuilder
    reference: str
    needs_teacher: bool = False
    min_students: int = 1
    default_students: int = 1
    default_teacher: str | None = None
    default_temperature: Callable[[Config], float] = lambda cfg: 1.0

    def check(self, cfg: Config) -> None:
        if cfg.students is not None and cfg.students < self.min_students:
            raise ConfigError("students", cfg.students,
                              f"at least {self.min_students} for {self.name} (each student learns from its peers)")

    def resolve(self, cfg: Config) -> Config:
        return cfg.replace(
            students=cfg.students or self.default_students,
            temperature=cfg.temperature or self.default_temperature(cfg),
            teacher=(cfg.teacher or self.default_teacher) if self.needs_teacher else None,
        )

    def objective(self, cfg: Config, teacher: Teacher | None) -> Objective:
        terms = self.terms(cfg, teacher)
        return Objective(terms, cfg.alpha if terms else 0.0, cfg.alpha_warmup)


METHODS: Registry[Method] = Registry("algorithm")


def method(name: str, reference: str, **options: object) -> Callable[[TermsBuilder], TermsBuilder]:
    """Register ``fn(cfg, teacher) -> terms`` as algorithm ``name``."""

    def decorator(fn: TermsBuilder) -> TermsBuilder:
        METHODS.add(name, Method(name, fn, reference, **options))  # type: ignore[arg-type]
        return fn

    return decorator


def _t(cfg: Config) -> float:
    assert cfg.temperature is not None, "resolve the config first"
    return cfg.temperature


@method("baseline", "supervised training of the student alone")
def _baseline(cfg: Config, teacher: Teacher | None) -> tuple[Term, ...]:
    return ()


@method("kd", "Hinton, Vinyals, Dean 2015", needs_teacher=True, default_teacher="resnet50",
        default_temperature=lambda cfg: 20.0)
def _kd(cfg: Config, teacher: Teacher | None) -> tuple[Term, ...]:
    assert teacher is not None
    return (Term("kd", teacher, cfg.divergence, _t(cfg)),)


@method("dml", "Zhang et al. 2018, Deep Mutual Learning", min_students=2, default_students=3)
def _dml(cfg: Config, teacher: Teacher | None) -> tuple[Term, ...]:
    return (Term("dml", Peers("pairwise", name="dml"), cfg.divergence, _t(cfg)),)


@method("dml_e", "DML against the mean of the peers (thesis)", min_students=2, default_students=3)
def _dml_e(cfg: Config, teacher: Teacher | None) -> tuple[Term, ...]:
    return (Term("dml_e", Peers("mean", name="dml_e"), cfg.divergence, _t(cfg)),)


@method("tfkd", "Yuan et al. 2020, teacher-free KD (virtual teacher)",
        default_temperature=lambda cfg: 20.0 if cfg.virtual_smooth else 1.0)
def _tfkd(cfg: Config, teacher: Teacher | None) -> tuple[Term, ...]:
    return (Term("tfkd", Virtual(cfg.virtual_p, cfg.virtual_smooth, name="tfkd"), cfg.divergence, _t(cfg)),)
