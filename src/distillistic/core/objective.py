"""The objective: a weighted sum of terms, one per teaching signal (DESIGN.md, sections 1 and 7).

For student ``i`` with outputs ``z_i`` (logits ``[B, K]``), labels ``y`` ``[B]`` and progress ``p`` in
[0, 1] of training::

    L_i = sum_k w_k(p) * term_k(i)

A :class:`Term` is a teaching signal's detached target, a loss and a weight; cross-entropy is a term
too (:class:`CrossEntropy`). Two compositions set the weights:

* ``thesis`` (the default, the thesis's form): ``L = (1 - a) * CE + a * sum_k w_k * D_k`` with the
  distillation weight ``a`` (alpha) optionally warmed up from 0 over a share of training;
* ``sum``: ``L = sum_k w_k(p) * term_k``, each term with its own weight and ramp (``CE + b X + g Y``).

:meth:`Objective.compose` is the one place a method's terms are weighed (the registry passes it the method's
composition, α and the authors' own weights, if any).

Terms are modules: a term may own trainable parameters per student (an adapter, a temperature), which
join that student's optimizer, and state (a memory bank), which goes into the checkpoint; after every
optimizer step each term's :meth:`Term.after_step` runs (memory banks, schedules).

A :class:`Companion` teaches nothing and has no weight: it is kept beside the students (an EMA copy of each,
:mod:`distillistic.core.ema`), updated after every optimizer step, evaluated and exported as a model of its
own. The objective owns its companions (their state is in its state dict); a term that reads one (PCL's
temporal mean teachers) is given it when it is built and lists it in :attr:`Term.companions`.

A training step makes one call, :meth:`Objective.step`: the teaching stage, every term's targets and each
student's ``{"loss", "ce", <term>: scalar}`` (a :class:`StepLosses`, as timm's distillation task's forward
returns its loss and named parts); after the optimizer step, :meth:`Objective.after_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.core.divergences import DIVERGENCES, SYMBOLS
from distillistic.core.logits import logit_transform
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import Signal, StepInputs, Teaching

Ramp = Callable[[float], float]  # progress in [0, 1] -> factor of the term's weight


def constant(progress: float) -> float:
    return 1.0


def epoch_progress(progress: float, epochs: int) -> float:
    """``e / E``: the share of training at the end of the 1-based epoch ``e`` that ``progress`` falls in.

    The references' warm-ups (mdistiller's trainer, CTKD's ``train_student.py``) are called once per epoch
    with the 1-based epoch ``e``: a warm-up over ``w·E`` epochs weighs ``e / (w·E)`` through epoch ``e``, so the
    first epoch already weighs ``1 / (w·E)``. Passing this instead of ``progress`` reproduces them.
    """
    if epochs < 1:
        return progress
    return (min(math.floor(progress * epochs + 1e-9), epochs - 1) + 1) / epochs


class Companion(nn.Module):
    """A model kept beside the students that teaches nothing (no loss, no weight): an EMA copy of each.

    The objective owns it (its state is checkpointed with the objective's), binds it to the students, runs
    :meth:`after_step` after every optimizer step and evaluates its :meth:`members` like students.
    """

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        """Called once when the students are built, before a resume loads any state (see :meth:`Term.bind`)."""

    def after_step(self, inp: StepInputs) -> None:
        """Called once after every optimizer step."""

    def members(self) -> list[tuple[int, str, nn.Module]]:
        """Models evaluated, selected on val, reported and exported like students: ``(student index, name
        suffix, model)``, e.g. ``(0, "ema", copy)`` -> ``student0_ema``."""
        return []


class Term(nn.Module):
    """One teaching signal + its loss + its weight. Subclasses implement :meth:`loss` and :meth:`describe`.

    ``distil``: the term is part of the distillation share ``alpha`` of the thesis's composition.
    ``student_stages`` / ``teacher_stages``: the tapped stages the term reads (``inp.features``, the teacher's
    ``features``); a run registers hooks only for the stages its terms name.
    ``companions``: the companions the term reads (a plain tuple, not submodules: the objective owns them).
    """

    student_stages: tuple[str, ...] = ()
    teacher_stages: tuple[str, ...] = ()
    strong_view: bool = False  # the term reads a strongly augmented view of the batch (``inp.strong_views``)
    companions: tuple[Companion, ...] = ()

    def __init__(self, name: str, weight: float = 1.0, distil: bool = True, ramp: Ramp = constant) -> None:
        super().__init__()
        self.name, self.weight, self.distil, self.ramp = name, weight, distil, ramp

    def targets(self, inp: StepInputs) -> list[Tensor] | None:
        """Detached target distributions ``[M, B, K]`` per student, computed once per step (None: no target).

        They are what the term teaches and are also monitored (their entropy and ECE are logged)."""
        return None

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        """The scalar term for student ``i`` with logits ``z`` ``[B, K]`` (with gradient)."""
        raise NotImplementedError

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        """Trainable parameters that belong with student ``i`` (its optimizer, DDP, checkpoint)."""
        return iter(())

    def after_step(self, inp: StepInputs) -> None:
        """Called once after every optimizer step (memory banks, schedules)."""

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        """Called once when the students are built, before a resume loads any state: the plain student
        modules (unwrapped, on the device) and each one's view ``(size, channels, norm)`` (for
        :func:`~distillistic.core.signals.model_view`)."""

    def student_model(self, i: int, model: nn.Module) -> nn.Module:
        """The model student ``i`` is trained, evaluated and exported as, given its plain ``model`` (the one whose
        stages are tapped): ``model`` itself, or a module around it (a method that adds its own layers to the
        deployed student, such as a reused teacher classifier). Called once, before the students are wrapped."""
        return model

    def stats(self, i: int) -> dict[str, float]:
        """Values of the term's own state for student ``i`` logged with each epoch's training rows (e.g. a
        learned temperature); read once per epoch, so a host sync here is fine."""
        return {}

    def describe(self) -> str:
        raise NotImplementedError


class CrossEntropy(Term):
    """``CE(z, y)``: the supervised term, mean over the batch (float32 whatever the autocast); on mixed images
    (``inp.mixed_labels``) the cross-entropy to their mixed labels ``[B, K]``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__("ce", weight, distil=False)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        z = at_least_float32(z)
        if inp.mixed_labels is not None:
            return F.cross_entropy(z, inp.mixed_labels.to(z.dtype))
        return F.cross_entropy(z, inp.labels)

    def describe(self) -> str:
        return "CE(z, y)"


class Distill(Term):
    """``weight * D(signal || student; T)``: a divergence to a signal's target distribution.

    ``standardize`` (Sun et al. 2024, logit standardisation): the signal's logits and the student's logits ``z``
    ``[B, K]`` are z-scored per sample before the temperature (:func:`~distillistic.core.logits.logit_transform`,
    handed to the signal); the signal must be made of logits (``Signal.of_logits``).
    """

    def __init__(self, name: str, signal: Signal, divergence: str = "kl", temperature: float = 1.0,
                 weight: float = 1.0, ramp: Ramp = constant, standardize: bool = False) -> None:
        super().__init__(name, weight, distil=True, ramp=ramp)
        self.signal, self.divergence, self.temperature = signal, divergence, temperature
        self._fn = DIVERGENCES.get(divergence)
        self.standardize, self.transform = standardize, logit_transform(standardize)
        if standardize and not getattr(signal, "of_logits", False):
            raise ValueError(f"the signal of {name} is not made of logits: it cannot be standardised")

    def targets(self, inp: StepInputs) -> list[Tensor]:
        return self.signal.targets(inp, self.temperature, self.transform)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        assert target is not None
        return self._fn(target, self.transform(z) if self.transform else z, self.temperature)

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        d = SYMBOLS.get(self.divergence, self.divergence.upper())
        scale, student = (f"{t}²·", f"softmax(z/{t})") if self.temperature != 1 else ("", "softmax(z)")
        core = f"{scale}{d}({self.signal.describe(self.temperature)} ‖ {student})"
        if self.signal.pairwise:
            core = f"mean_(j≠i) {core}"
        if self.standardize:
            core = f"{core} on z-scored logits"
        return core  # its weight is the objective's to print


@dataclass
class StepLosses:
    """One step's objective: each student's ``{"loss", "ce", <term name>: scalar}``, every term's detached targets
    (the meters monitor them), the weights at the step's progress and, when asked for (an optimizer that takes
    the distillation gradient apart), each student's ``(distillation part, task part)`` of its loss."""

    outs: list[dict[str, Tensor]]
    targets: dict[str, list[Tensor] | None]
    weights: dict[str, float]
    parts: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class Objective(nn.Module):
    """The terms of a method and their composition (see the module docstring)."""

    def __init__(self, terms: tuple[Term, ...] = (), alpha: float = 0.0, alpha_warmup: float = 0.0,
                 composition: Literal["thesis", "sum"] = "thesis", ce: Term | None = None,
                 companions: tuple[Companion, ...] = (), teaching: Teaching | None = None) -> None:
        super().__init__()
        self.teaching = teaching if teaching is not None else Teaching()  # the teachers' forward, first in a step
        self.ce = ce if ce is not None else CrossEntropy()
        self.terms = nn.ModuleList(terms)
        # Models kept beside the students (EMA copies): those given (--ema) and those a term reads (pcl).
        read = [c for t in terms for c in t.companions]
        self.companions = nn.ModuleList(dict.fromkeys([*companions, *read]))
        self.alpha = alpha if terms else 0.0
        self.alpha_warmup, self.composition = alpha_warmup, composition

    @classmethod
    def compose(cls, terms: tuple[Term, ...], composition: Literal["thesis", "sum"], alpha: float,
                alpha_warmup: float = 0.0, own_weights: tuple[float, float] | None = None, ce: Term | None = None,
                companions: tuple[Companion, ...] = (), teaching: Teaching | None = None) -> Objective:
        """The one place a method's terms are weighed: the thesis's ``(1 - a)·CE + a·Σ w_k·term_k`` (``a`` warmed up
        over ``alpha_warmup``), a ``sum`` of the terms' own weights, or the authors' ``w_CE·CE + w·term`` when
        ``own_weights`` (their ``(w_CE, w)``, the user having set no α) do not sum to 1 (then there is no α)."""
        if own_weights is not None and not math.isclose(sum(own_weights), 1.0) and terms:
            ce = ce if ce is not None else CrossEntropy()
            ce.weight = own_weights[0]
            for term in terms:
                term.weight = own_weights[1]
            return cls(terms, 0.0, 0.0, "sum", ce=ce, companions=companions, teaching=teaching)
        thesis = composition == "thesis"
        return cls(terms, alpha if terms and thesis else 0.0, alpha_warmup, composition, ce=ce, companions=companions,
                   teaching=teaching)

    @property
    def extra(self) -> list[Term]:
        return list(self.terms)  # type: ignore[arg-type]

    def alpha_at(self, progress: float) -> float | None:
        """alpha after ``progress`` in [0, 1] of training (epochs done / epochs); None for a sum, which has none."""
        if self.composition != "thesis":
            return None
        if not self.terms:
            return self.alpha
        if self.alpha_warmup <= 0:
            return self.alpha
        return self.alpha * min(1.0, progress / self.alpha_warmup)

    @property
    def names(self) -> list[str]:
        return ["loss", "ce", *(t.name for t in self.extra)]

    def weights_at(self, progress: float) -> dict[str, float]:
        """Each term's weight at ``progress``: the thesis's ``(1 - a, a * w_k)`` or ``w_k * ramp_k(p)``."""
        if self.composition == "sum":
            return {t.name: t.weight * t.ramp(progress) for t in [self.ce, *self.extra]}
        a = self.alpha_at(progress)
        assert a is not None
        return {"ce": 1 - a if self.terms else 1.0} | {t.name: a * t.weight * t.ramp(progress) for t in self.extra}

    def targets(self, inp: StepInputs) -> dict[str, list[Tensor] | None]:
        """The step's first stages: the teaching stage (every frozen teacher's outputs on the batch, read from its
        store or computed, into ``inp.teachers``), then every term's detached targets (shared by the cohort)."""
        self.teaching(inp)
        return {t.name: t.targets(inp) for t in self.extra}

    def forward(self, i: int, z: Tensor, inp: StepInputs, targets: dict[str, list[Tensor] | None],
                weights: dict[str, float]) -> dict[str, Tensor]:
        """Student ``i``'s terms and loss: ``{"loss", "ce", <term name>: scalar}``."""
        ce = self.ce.loss(i, z, inp, None)
        out = {"ce": ce}
        loss = weights["ce"] * ce if (self.terms or weights["ce"] != 1.0) else ce
        for term in self.extra:
            target = targets[term.name]
            value = term.loss(i, z, inp, target[i] if target is not None else None)
            out[term.name] = value
            loss = loss + weights[term.name] * value
        out["loss"] = loss
        return out

    def step(self, inp: StepInputs, logits: Sequence[Tensor], split: bool = False) -> StepLosses:
        """The whole objective of one step, in one call: :meth:`targets` (the teaching stage, then every term's
        targets) and each student's terms and loss (:meth:`forward`) at ``inp.progress``'s weights; with
        ``split``, each student's :meth:`distillation_part` and :meth:`task_part` too."""
        weights = self.weights_at(inp.progress)
        targets = self.targets(inp)
        outs = [self(i, z, inp, targets, weights) for i, z in enumerate(logits)]
        parts = [(self.distillation_part(o, weights), self.task_part(o, weights)) for o in outs] if split else []
        return StepLosses(outs, targets, weights, parts)

    def student_parameters(self, i: int) -> list[nn.Parameter]:
        return [p for t in [self.ce, *self.extra] for p in t.student_parameters(i)]

    def distillation_part(self, out: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
        """The weighted sum of the distillation terms (``Term.distil``) of a :meth:`forward` output: the part of
        ``out["loss"]`` whose gradient an optimizer may take apart (``loss - part`` is the task's)."""
        parts = [weights[t.name] * out[t.name] for t in self.extra if t.distil]
        return sum(parts[1:], parts[0]) if parts else out["loss"].new_zeros(())

    def task_part(self, out: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
        """The weighted sum of the cross-entropy and the terms that do not distil (``loss`` minus the above)."""
        ce = weights["ce"] * out["ce"] if (self.terms or weights["ce"] != 1.0) else out["ce"]
        return sum((weights[t.name] * out[t.name] for t in self.extra if not t.distil), ce)

    @property
    def strong_view(self) -> bool:
        """Whether a term reads a strongly augmented view of each batch (the run's views then make one)."""
        return any(t.strong_view for t in self._all())

    def _all(self) -> list[Term]:
        return [self.ce, *self.extra]

    def _companions(self) -> list[Companion]:
        return list(self.companions)  # type: ignore[arg-type]

    def after_step(self, inp: StepInputs) -> None:
        """Every term's, then every companion's :meth:`after_step` (once, after the optimizer step)."""
        for t in self._all():
            t.after_step(inp)
        for c in self._companions():
            c.after_step(inp)

    def bind(self, students: Sequence[nn.Module], views: Sequence[tuple[Any, ...]]) -> None:
        """Every term's and companion's ``bind`` (once, when the students are built)."""
        for t in self._all():
            t.bind(students, views)
        for c in self._companions():
            c.bind(students, views)

    def student_model(self, i: int, model: nn.Module) -> nn.Module:
        """Student ``i``'s model after every term's :meth:`Term.student_model`."""
        for t in self._all():
            model = t.student_model(i, model)
        return model

    def members(self) -> list[tuple[int, str, nn.Module]]:
        """Every companion's evaluated models (see :meth:`Companion.members`)."""
        return [m for c in self._companions() for m in c.members()]

    def stats(self, i: int) -> dict[str, float]:
        """Every term's :meth:`Term.stats` for student ``i``, merged (logged with the epoch's training rows)."""
        return {k: v for t in [self.ce, *self.extra] for k, v in t.stats(i).items()}

    def __str__(self) -> str:
        if self.composition == "sum":
            parts = [t.describe() if t.weight == 1 else f"{t.weight:g}·{t.describe()}" for t in [self.ce, *self.extra]]
            return "L = " + " + ".join(parts)
        ce = self.ce.describe()
        if not self.terms:
            return f"L = {ce}"
        a, rest = f"{self.alpha:g}", f"{1 - self.alpha:g}"
        distil = " + ".join(t.describe() if t.weight == 1 else f"{t.weight:g}·{t.describe()}" for t in self.extra)
        warm = f", alpha rising from 0 over the first {self.alpha_warmup:.0%} of training" if self.alpha_warmup else ""
        if len(self.terms) > 1:
            distil = f"[{distil}]"
        return f"L = {rest}·{ce} + {a}·{distil}{warm}"
