"""A method's description as plain data: its hyper-parameters, family, reference and formula (no torch).

Every method module of :mod:`distillistic.methods` assigns a :class:`MethodSpec` at module level. The specs are
read without importing the modules (:mod:`distillistic.methods.catalogue`), so that the config's fields, the
CLI's flags and ``--help``, ``distillistic list algos`` and the tuner's search spaces all come from them while
``distillistic --help`` still imports no torch. A :class:`Param` is one hyper-parameter: its type, the paper's
default with its citation, its valid range, its help line and the search space tuning draws from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["supervised", "teacher", "cohort", "self"]
Scale = Literal["linear", "log"]


@dataclass(frozen=True)
class Interval:
    """A closed, open or half-open range of numbers: ``low`` (inclusive unless ``open_low``) to ``high``."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"a number {'>' if self.open_low else '>='} {self.low:g}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"


def at_least(low: float) -> Interval:
    return Interval(low)


def above(low: float) -> Interval:
    return Interval(low, open_low=True)


def share(*, closed: bool = False) -> Interval:
    """A share of training in ``[0, 1)`` (or ``[0, 1]`` with ``closed``)."""
    return Interval(0.0, 1.0, open_high=not closed)


def decay() -> Interval:
    """An EMA decay in ``(0, 1)``."""
    return Interval(0.0, 1.0, open_low=True, open_high=True)


@dataclass(frozen=True)
class Space:
    """Where tuning draws a parameter from: ``[low, high]`` on a linear or log scale, or one of ``choices``."""

    low: float | None = None
    high: float | None = None
    scale: Scale = "linear"
    integer: bool = False
    choices: tuple[Any, ...] = ()


def uniform(low: float, high: float) -> Space:
    return Space(low, high)


def log_uniform(low: float, high: float) -> Space:
    return Space(low, high, scale="log")


def int_range(low: int, high: int) -> Space:
    return Space(low, high, integer=True)


def choice(*values: Any) -> Space:
    return Space(choices=tuple(values))


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a method, and the config key that sets it.

    ``type`` is ``float``, ``int``, ``bool``, ``str`` or ``tuple`` (a list of names); ``optional`` allows
    ``None`` (unset: the method derives the value). ``range`` bounds numbers; ``choices`` lists the valid
    strings; ``space`` is the tuner's search space (``None``: not tuned). ``cite`` says where the default
    comes from (the paper's equation or table, or the authors' code: file and line). ``derived_from``: the key
    naming another run whose results set this one when the run starts (its saved config holds the value used).
    """

    name: str
    type: type
    default: Any
    help: str
    cite: str = ""
    range: Interval | None = None
    choices: tuple[str, ...] = ()
    space: Space | None = None
    optional: bool = False
    allowed: str = ""  # how the valid values read in an error, when the range's own wording is not enough
    derived_from: str | None = None

    def check(self, value: Any) -> str | None:
        """``None`` if ``value`` is valid, else the valid values in words (for a one-line error)."""
        if value is None:
            return None if self.optional else "a value (this key cannot be unset)"
        if self.choices and value not in self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.range is not None and self.type in (int, float) and value not in self.range:
            return self.allowed or self.range.describe()
        return None


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter as its sources give it, for the defaults table of ``docs/methods.md``.

    ``key``: a config key (one of the method's parameters, or a common key such as ``temperature`` or
    ``alpha``); ``paper``: the paper's value and where (equation, table, section), "—" if it gives none;
    ``code``: the authors' code's value with file and line; ``follows``: where they differ, which one
    distillistic follows and why; ``ours``: distillistic's value, for a common key only (a parameter's is its
    :class:`Param`'s default).
    """

    key: str
    paper: str
    code: str
    follows: str = ""
    ours: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, as data: its name, paper, formula, family, parameters, and the common keys it reads.

    ``reads`` lists the common config keys the method uses beyond the ones every run reads (a teacher, alpha,
    a temperature, a divergence …); any other of those keys set away from its default is refused for it, so no
    flag is silently ignored. ``composition``: ``thesis`` is ``(1 − α)·CE + α·terms``; ``sum`` is
    ``CE + Σ_k w_k·term_k`` with the weights among its parameters (``weights``), and refuses α.
    """

    name: str
    reference: str
    formula: str
    family: Family = "supervised"
    params: tuple[Param, ...] = ()
    reads: tuple[str, ...] = ()
    needs_teacher: bool = False
    default_teacher: str | None = None  # None with needs_teacher: the student's own architecture
    min_students: int = 1
    default_students: int = 1
    temperature: float = 1.0  # the default T (a method may derive it from its parameters instead)
    composition: Literal["thesis", "sum"] = "thesis"
    weights: tuple[str, ...] = ()
    notes: str = ""
    generations: bool = False  # trained as a sequence of runs, each taught by the last (born-again)
    optimizer: str | None = None  # the --optimizer its own optimizer is a form of (DOT: sgd); another is refused
    defaults: tuple[Setting, ...] = ()  # the paper's and the authors' code's values (docs/methods.md)
    extra: dict[str, Any] = field(default_factory=dict)

    def keys(self) -> tuple[str, ...]:
        """The config keys of this method's own parameters."""
        return tuple(p.name for p in self.params)

    def keys_read(self) -> frozenset[str]:
        """Every optional common key and own parameter this method reads."""
        common = set(self.reads)
        if self.composition == "thesis" and self.family != "supervised":  # a distillation share alpha
            common |= {"alpha", "alpha_warmup"}
        if self.needs_teacher:
            common |= set(TEACHER_KEYS)
        if self.family == "cohort":
            common.add("peer_views")
        return frozenset(common | set(self.keys()))


# Common keys that only some methods read: set away from their defaults for another method, they are refused.
TEACHER_KEYS = ("teacher", "teacher_weights", "teacher_mix", "teacher_epochs", "teacher_init", "teacher_seed",
                "teacher_resolution", "teacher_calibration")
DISTILL_KEYS = ("alpha", "alpha_warmup", "temperature", "divergence")
OPTIONAL_KEYS = (*TEACHER_KEYS, *DISTILL_KEYS, "peer_views")

# Where the feature methods' weights come from (the sample script and config of the two reference libraries).
REPDISTILLER_SCRIPT = "HobbitLong/RepDistiller@b84f547, scripts/run_cifar_distill.sh"
MDISTILLER_CFG = "megvii-research/mdistiller@a08d46f, mdistiller/engine/cfg.py"
KD_T_FOR_FEATURES = Setting("temperature", "—", "HobbitLong/RepDistiller@b84f547, train_student.py:78: --kd_T 4 "
                            "(the KD term of --feature-kd)", ours="4")

# Parameters several methods share (they are defined once, here, and listed in each method's spec).
LOGIT_STANDARDIZE = Param(
    "logit_standardize", bool, False,
    "z-score the teacher's (or peers') and the student's logits per sample before the temperature",
    cite="Sun et al. 2024, Logit Standardization in Knowledge Distillation (CVPR), eq. 6", space=choice(False, True))
FEATURE_WEIGHT = Param(
    "feature_weight", float, None, "weight of the feature term (default: the paper's for the method)",
    cite="RepDistiller's train_student.py -b per method", range=at_least(0.0), optional=True,
    allowed="a number >= 0 (or unset: the paper's)")
FEATURE_KD = Param(
    "feature_kd", float, 0.0, "weight of an added KD term T²·KL(softmax(t/T) ‖ softmax(z/T)) (0: none)",
    cite="RepDistiller's train_student.py -a (0 for the feature-only rows of Tian et al. 2020, table 1)",
    range=at_least(0.0), space=uniform(0.0, 1.0))
# The spec options every feature method shares (fitnet, at, sp, rkd, crd): a sum CE + β·feature term [+ KD].
FEATURE: dict[str, Any] = dict(family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0,
                               composition="sum", weights=("feature_weight", "feature_kd"),
                               reads=("temperature", "divergence"))
