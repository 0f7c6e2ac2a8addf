"""The methods' registry: each method is one registered function that returns its terms.

A method never touches the training loop. It declares its students (how many, at least), whether it
needs a frozen teacher, its default temperature, the config keys it reads (its *parameters*: typed
config fields with defaults, help and range checks in :mod:`distillistic.config`), the paper it
implements and its formula; its function returns the :class:`~distillistic.core.objective.Term` s
beside cross-entropy. Nothing outside this registry names an algorithm: the loop, the config, the
report and the demo ask a method what they need to know.

Adding a method is one decorated function below (or in another module that registers into
:data:`METHODS`); the tests parametrize over the registry, so it gets an end-to-end run, a torchrun
run of its family and a golden-step check without another line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from distillistic.config import FIELDS, THESIS_ALPHA, Config
from distillistic.core.ema import EmaCopies
from distillistic.core.features import FeatureProbe
from distillistic.core.objective import Distill, Objective, Term
from distillistic.core.signals import Peers, Signal, Virtual
from distillistic.errors import ConfigError, UserError
from distillistic.registry import Registry

Family = Literal["supervised", "teacher", "cohort", "self"]


@dataclass(frozen=True)
class Context:
    """What a method's terms may be built from, besides the config."""

    teacher: Signal | None = None  # the frozen teacher(s)' signal, for methods that need one
    num_classes: int = 0
    students: int = 1
    probe: FeatureProbe | None = None  # the run's models' stages and feature shapes (feature methods)


TermsBuilder = Callable[[Config, Context], tuple[Term, ...]]


@dataclass(frozen=True)
class Method:
    name: str
    terms: TermsBuilder
    reference: str
    formula: str = ""
    family: Family = "supervised"
    params: tuple[str, ...] = ()  # the config keys this method reads beyond the common ones
    needs_teacher: bool = False
    min_students: int = 1
    default_students: int = 1
    default_teacher: str | Callable[[Config], str] | None = None  # a name, or one derived from the config
    default_temperature: Callable[[Config], float] = field(default=lambda cfg: 1.0)
    composition: Literal["thesis", "sum"] = "thesis"
    # A sum composition: the config keys that set its terms' weights (what to use instead of alpha, which it refuses).
    weights: tuple[str, ...] = ()
    data_check: Callable[[Config, int], None] | None = None
    # Trained as generations (born-again): their count, and generation g's config (g = 1, 2, ...) taught by the
    # run directory of generation g - 1 (None for g = 1). Each generation is a run of its own.
    generations: Callable[[Config], int] | None = None
    generation: Callable[[Config, int, str | None], Config] | None = None
    supervised: Callable[[Config], Term] | None = None  # the term that replaces CE(z, y) (label smoothing)

    def check(self, cfg: Config) -> None:
        """Refuse a cohort too small for the method, independent views outside a cohort, alpha given to a method
        that does not use it, and another method's parameters set to non-defaults."""
        n = student_count(cfg)
        if n is not None and n < self.min_students:
            raise ConfigError("students", cfg.students,
                              f"at least {self.min_students} for {self.name} (each student learns from its peers)")
        if cfg.peer_views != "shared" and self.family != "cohort":
            cohorts = ", ".join(m for m in METHODS if METHODS.get(m).family == "cohort")
            raise ConfigError("peer_views", cfg.peer_views,
                              f"shared for algo {self.name}: independent views are for the students of a cohort "
                              f"learning from each other ({cohorts})")
        if self.composition == "sum":  # alpha would be silently ignored: refuse it when set
            for key, unset in (("alpha", None), ("alpha_warmup", 0.0)):
                if getattr(cfg, key) != unset:
                    instead = f"set {', '.join(self.weights)} instead" if self.weights else "keep its weights"
                    raise UserError(f"config key '{key}' is not used by algo {self.name}: its loss is CE plus its "
                                    "own weighted terms, not (1 - alpha) CE + alpha * divergence; remove "
                                    f"{key} and {instead}")
        weights = [getattr(cfg, k) for k in self.weights]
        if not math.isfinite(sum(abs(w) for w in weights if isinstance(w, (int, float)))):
            raise UserError(f"the weights of algo {self.name} ({', '.join(self.weights)}) sum to more than a float "
                            "holds; they weigh loss terms: choose values of a few units or hundreds")
        for key in sorted(PARAMETERS):
            if key not in self.params and getattr(cfg, key) != FIELDS[key].default:
                owners = ", ".join(sorted(m for m in METHODS if key in METHODS.get(m).params))
                raise UserError(f"config key '{key}' is a parameter of {owners}, not of algo {self.name}; "
                                f"remove it or choose one of those algorithms")

    def check_for_data(self, cfg: Config, num_classes: int) -> None:
        if self.data_check is not None:
            self.data_check(cfg, num_classes)

    def resolve(self, cfg: Config) -> Config:
        default = self.default_teacher(cfg) if callable(self.default_teacher) else self.default_teacher
        alpha = cfg.alpha if cfg.alpha is not None else THESIS_ALPHA if self.composition == "thesis" else None
        return cfg.replace(
            alpha=alpha,  # unset (None) for a sum composition, which has no alpha
            students=cfg.students or self.default_students,
            temperature=cfg.temperature or self.default_temperature(cfg),
            teacher=(cfg.teacher or default) if self.needs_teacher else None,
        )

    def objective(self, cfg: Config, ctx: Context) -> Objective:
        terms = self.terms(cfg, ctx)
        ce = self.supervised(cfg) if self.supervised is not None else None
        companions = (EmaCopies(cfg.ema),) if cfg.ema is not None else ()  # --ema: an EMA copy of every student
        alpha = cfg.alpha if cfg.alpha is not None else THESIS_ALPHA
        return Objective(terms, alpha if terms and self.composition == "thesis" else 0.0, cfg.alpha_warmup,
                         self.composition, ce=ce, companions=companions)


METHODS: Registry[Method] = Registry("algorithm")
PARAMETERS: set[str] = set()  # every method's parameters: set for another method, they are refused


def student_count(cfg: Config) -> int | None:
    """Students in the cohort: ``students`` as a count, or the number of architectures it lists."""
    value = cfg.students
    return len(value) if isinstance(value, tuple) else value


def method(name: str, reference: str, **options: object) -> Callable[[TermsBuilder], TermsBuilder]:
    """Register ``fn(cfg, ctx) -> terms`` as algorithm ``name``; its docstring's first line is its formula."""

    def decorator(fn: TermsBuilder) -> TermsBuilder:
        formula = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        spec = Method(name, fn, reference, formula, **options)  # type: ignore[arg-type]
        for key in (*spec.params, *spec.weights):
            if key not in FIELDS:
                raise ValueError(f"method {name}: parameter '{key}' is not a config key")
        METHODS.add(name, spec)
        PARAMETERS.update(spec.params)
        return fn

    return decorator


def _t(cfg: Config) -> float:
    assert cfg.temperature is not None, "resolve the config first"
    return cfg.temperature


@method("baseline", "supervised training of the student alone")
def _baseline(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = CE(z, y)"""
    return ()


@method("kd", "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network", family="teacher",
        needs_teacher=True, default_teacher="resnet50", default_temperature=lambda cfg: 20.0,
        params=("logit_standardize",))
def _kd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)); several teachers: their mean softmax(t_j/T)"""
    assert ctx.teacher is not None
    return (Distill("kd", ctx.teacher, cfg.divergence, _t(cfg), standardize=cfg.logit_standardize),)


@method("dml", "Zhang et al. 2018, Deep Mutual Learning (CVPR)", family="cohort", min_students=2,
        default_students=3, params=("logit_standardize",))
def _dml(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L_i = (1-a) CE(z_i, y) + a mean_(j≠i) KL(softmax(z_j/T) ‖ softmax(z_i/T)), peers detached"""
    return (Distill("dml", Peers("pairwise", name="dml"), cfg.divergence, _t(cfg),
                    standardize=cfg.logit_standardize),)


@method("dml_e", "DML against the mean of the peers (thesis)", family="cohort", min_students=2,
        default_students=3, params=("logit_standardize",))
def _dml_e(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L_i = (1-a) CE(z_i, y) + a KL(mean_(j≠i) softmax(z_j/T) ‖ softmax(z_i/T))"""
    return (Distill("dml_e", Peers("mean", name="dml_e"), cfg.divergence, _t(cfg),
                    standardize=cfg.logit_standardize),)


def _virtual_p_check(cfg: Config, num_classes: int) -> None:
    if not cfg.virtual_p > 1.0 / num_classes:
        raise ConfigError("virtual_p", cfg.virtual_p,
                          f"a probability in (1/K, 1] = ({1.0 / num_classes:.4g}, 1] for K = {num_classes} classes")


@method("tfkd", "Yuan et al. 2020, Revisiting KD via Label Smoothing Regularization (CVPR): virtual teacher",
        family="self", params=("virtual_p", "virtual_smooth", "virtual_p_from"), data_check=_virtual_p_check,
        default_temperature=lambda cfg: 20.0 if cfg.virtual_smooth else 1.0)
def _tfkd(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    """L = (1-a) CE(z, y) + a KL(v ‖ softmax(z)), v = p on y, (1-p)/(K-1) elsewhere (smoothed: softmax(v/T))"""
    return (Distill("tfkd", Virtual(cfg.virtual_p, cfg.virtual_smooth, name="tfkd"), cfg.divergence, _t(cfg)),)


# --- methods registered by other modules (they do not import this one: no import cycle) ---------------------
from distillistic.core import born_again, ema  # noqa: E402

for _module in (ema, born_again):
    _module.register(method)
