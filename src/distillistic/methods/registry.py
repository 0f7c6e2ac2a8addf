"""The methods' registry: a method is its spec (plain data) + the function that builds its terms + its hooks.

Kept apart from the methods themselves (as timm keeps ``_registry.py`` apart from its model families): each
module of :mod:`distillistic.methods` calls :func:`register_method` once per method it defines, and
:data:`METHODS` imports a built-in method's module the first time its name is asked for. A method from the
user's own module registers the same way (``plugins: [my_methods]``), its parameters joining the config.

The generic checks live here, once for every method: a cohort too small, and any optional common key (a
teacher, alpha, a temperature, a divergence, independent views) or another method's parameter set away from
its default for a method that does not read it is refused with one line naming the methods that do.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distillistic import config as config_mod
from distillistic.config import THESIS_ALPHA, Config
from distillistic.core.ema import EmaCopies
from distillistic.core.features import FeatureProbe
from distillistic.core.objective import Objective, Term
from distillistic.core.signals import Signal, Teaching
from distillistic.errors import ConfigError, UserError
from distillistic.methods import catalogue
from distillistic.methods.spec import OPTIONAL_KEYS, MethodSpec
from distillistic.registry import Registry


@dataclass(frozen=True)
class Context:
    """What a method's terms may be built from, besides the config."""

    teacher: Signal | None = None  # the frozen teacher(s)' signal, for methods that need one
    num_classes: int = 0
    students: int = 1
    probe: FeatureProbe | None = None  # the run's models' stages and feature shapes (feature methods)


class Runs(Protocol):
    """Other runs a method may derive a setting from, as the run being set up reaches them."""

    def baseline(self, cfg: Config) -> Path:
        """The folder of the students' own architecture trained alone (trained once, cached as a teacher is)."""
        ...

    def summary(self, folder: Path) -> dict[str, Any]:
        """A run directory's ``summary.json`` (``{}`` when it has none)."""
        ...


TermsBuilder = Callable[[Config, Context], tuple[Term, ...]]
OptimizerHook = Callable[[Config, list[nn.Parameter]], torch.optim.Optimizer]
# (config, the plain student as built, its saved state, its spatial stages) -> the module that state loads into
StudentRebuilder = Callable[[Config, nn.Module, Mapping[str, Tensor], Callable[[], dict[str, nn.Module]]], nn.Module]
ConfigHook = Callable[[Config], None]
DataHook = Callable[[Config, int], None]


@dataclass(frozen=True)
class Method:
    """A registered method: its :class:`MethodSpec` and the code behind it.

    ``check_config(cfg)`` and ``data_check(cfg, num_classes)``: the method's own checks beyond the generic ones;
    ``temperature(cfg)``: its default T when it depends on its parameters; ``supervised(cfg)``: the term that
    replaces CE(z, y); ``generations(cfg)`` and ``generation(cfg, g, previous_run)``: a method trained as
    generations (born-again), each a run of its own; ``resolve_teacher(cfg)``: the default teacher when it
    depends on the config (self-training: the students' own architecture); ``authors_weights(cfg)``: the
    authors' ``(CE weight, term weight)`` when the user sets no alpha (None: the thesis's α = 0.5). Weights
    summing to 1 are α = the term's weight; others (logit standardisation's 0.1·CE + 9·KD) make the loss the sum
    ``w_CE·CE + w·term``, with no α. ``rebuild_student(cfg, model, state, stages)``: for a method whose terms
    put layers of their own around a student (:meth:`Term.student_model`), that module rebuilt around a freshly
    built plain ``model`` so that the saved ``state`` loads into it (export, prediction, ``load_student``);
    ``stages()`` gives the plain model's spatial stages. ``derive(cfg, runs)``: the config with the settings a
    method takes from another run (its parameters' ``derived_from``) filled in, when the run starts.
    """

    spec: MethodSpec
    terms: TermsBuilder
    check_config: ConfigHook | None = None
    data_check: DataHook | None = None
    temperature: Callable[[Config], float] | None = None
    supervised: Callable[[Config], Term] | None = None
    generations: Callable[[Config], int] | None = None
    generation: Callable[[Config, int, str | None], Config] | None = None
    resolve_teacher: Callable[[Config], str] | None = None
    optimizer: OptimizerHook | None = None
    authors_weights: Callable[[Config], tuple[float, float] | None] | None = None
    rebuild_student: StudentRebuilder | None = None
    derive: Callable[[Config, Runs], Config] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __getattr__(self, name: str) -> object:  # spec fields read through the method (method.family …)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.spec, name)

    def check(self, cfg: Config) -> None:
        """Refuse a cohort too small for the method, and every key it does not read (set away from default)."""
        n = student_count(cfg)
        if n is not None and n < self.spec.min_students:
            raise ConfigError("students", cfg.students, f"at least {self.spec.min_students} for {self.name} "
                                                        "(each student learns from its peers)")
        reads = self.spec.keys_read()
        for key in (*OPTIONAL_KEYS, *catalogue.params()):
            if key not in reads and getattr(cfg, key) != config_mod.default_of(key):
                raise UserError(_not_read(key, self.spec))
        weights = [getattr(cfg, k) for k in self.spec.weights]
        if not math.isfinite(sum(abs(w) for w in weights if isinstance(w, int | float))):
            raise UserError(f"the weights of algo {self.name} ({', '.join(self.spec.weights)}) sum to more than a "
                            "float holds; they weigh loss terms: choose values of a few units or hundreds")
        own = self._own_weights(cfg)
        if own is not None and not math.isclose(sum(own), 1.0) and cfg.alpha_warmup:
            raise UserError(f"--alpha-warmup ramps alpha, but algo {self.name} with these settings weighs "
                            f"{own[0]:g}·CE + {own[1]:g}·term (its authors'), with no alpha; set --alpha to use "
                            "(1 - alpha)·CE + alpha·term with a warm-up, or drop --alpha-warmup")
        if self.check_config is not None:
            self.check_config(cfg)

    def check_given(self, cfg: Config, given: Collection[str]) -> None:
        """Refuse a key the user ``given`` explicitly that the method overrides and whose default the checks of
        :meth:`check` cannot tell from an explicit value: an ``optimizer`` other than its own optimizer's form."""
        own = self.spec.optimizer
        if own is not None and "optimizer" in given and cfg.optimizer != own:
            raise UserError(f"config key 'optimizer' = '{cfg.optimizer}' is not used by algo {self.name}, which "
                            f"trains with its own optimizer (a form of {own}); remove optimizer, or set it to {own}")

    def check_for_data(self, cfg: Config, num_classes: int) -> None:
        if self.data_check is not None:
            self.data_check(cfg, num_classes)

    def _own_weights(self, cfg: Config) -> tuple[float, float] | None:
        """The authors' (CE, term) weights when the user set no alpha, else None."""
        if cfg.alpha is not None or self.authors_weights is None:
            return None
        return self.authors_weights(cfg)

    def _default_alpha(self, cfg: Config) -> float | None:
        """alpha when unset: the authors' (weights summing to 1), None for a sum of weights, else the thesis's."""
        own = self._own_weights(cfg)
        if own is None:
            return cfg.alpha if cfg.alpha is not None else THESIS_ALPHA
        return own[1] if math.isclose(sum(own), 1.0) else None

    def resolve(self, cfg: Config) -> Config:
        """Fill the keys the method defaults: alpha, the cohort's size, T, the teacher and its epochs."""
        spec = self.spec
        reads_t = "temperature" in spec.keys_read()
        default_t = self.temperature(cfg) if self.temperature else spec.temperature
        derived = self.resolve_teacher(cfg) if self.resolve_teacher else spec.default_teacher or cfg.model
        teacher = (cfg.teacher or (derived,)) if spec.needs_teacher else None
        return cfg.replace(
            alpha=self._default_alpha(cfg) if "alpha" in spec.keys_read() else None,
            students=cfg.students or spec.default_students,
            temperature=(cfg.temperature or default_t) if reads_t else None,
            teacher=teacher,
            teacher_epochs=(cfg.teacher_epochs or cfg.epochs) if spec.needs_teacher else None,
        )

    def objective(self, cfg: Config, ctx: Context) -> Objective:
        terms = self.terms(cfg, ctx)
        ce = self.supervised(cfg) if self.supervised is not None else None
        companions = (EmaCopies(cfg.ema),) if cfg.ema is not None else ()  # --ema: an EMA copy of every student
        teaching = Teaching.of(ctx.teacher)  # the frozen teachers' forward: a step's first stage
        alpha = cfg.alpha if cfg.alpha is not None else (self._default_alpha(cfg) or THESIS_ALPHA)
        return Objective.compose(terms, self.spec.composition, alpha, cfg.alpha_warmup, self._own_weights(cfg),
                                 ce=ce, companions=companions, teaching=teaching)


def _not_read(key: str, spec: MethodSpec) -> str:
    algo = spec.name
    if key in ("alpha", "alpha_warmup") and spec.composition == "sum":
        instead = f"set {', '.join(spec.weights)} instead" if spec.weights else "keep its weights"
        return (f"config key '{key}' is not used by algo {algo}: its loss is CE plus its own weighted terms, not "
                f"(1 - alpha) CE + alpha * divergence; remove {key} and {instead}")
    owners = catalogue.owners(key)
    users = f"it is read by {', '.join(owners)}" if owners else "no method reads it"
    return (f"config key '{key}' is not read by algo {algo} ({users}); remove it, or choose an algorithm "
            "that reads it")


class _Methods(Registry[Method]):
    """The registry of methods: a built-in method's module is imported the first time its name is asked for."""

    def _load(self, name: str) -> None:
        module = catalogue.builtin_module(name)
        if module is not None and name not in self._entries:
            importlib.import_module(module)

    def get(self, name: str) -> Method:
        self._load(name)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in catalogue.specs()

    def names(self) -> list[str]:
        return list(catalogue.specs())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unknown_message(self, name: str) -> str:
        self._entries.update({n: self.get(n) for n in self.names() if n not in self._entries})
        return super().unknown_message(name)


METHODS = _Methods("algorithm")


def register_method(spec: MethodSpec, terms: TermsBuilder, **behaviour: object) -> Method:
    """Register the method ``spec`` describes, whose terms ``terms(cfg, ctx)`` builds (hooks: see :class:`Method`).

    From outside this package, the spec's parameters become config keys, flags and ``--set`` keys for any run
    that imports the module (``plugins: [my_methods]``).
    """
    if catalogue.builtin_module(spec.name) is None:
        catalogue.add(spec)
    method = Method(spec, terms, **behaviour)  # type: ignore[arg-type]
    METHODS.add(spec.name, method)
    return method


def student_count(cfg: Config) -> int | None:
    """Students in the cohort: ``students`` as a count, or the number of architectures it lists."""
    value = cfg.students
    return len(value) if isinstance(value, tuple) else value
