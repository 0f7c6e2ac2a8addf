"""Teaching signals: a batch (and the students' current logits) -> detached target distributions.

A signal returns, for each student ``i`` of the cohort, a tensor ``[M, B, K]`` of ``M`` target
distributions per sample (``M = 1`` except for DML's pairwise peers). Targets never carry gradient:
the teacher runs under ``no_grad`` in eval mode with frozen weights, peers' logits are detached
before they get here, and the virtual teacher is built from labels alone.

The frozen teachers' forward is a stage of its own (:class:`Teaching`): once per step, before any term
runs, every teacher's outputs on the batch are read from its store or computed and put in
``StepInputs.teachers``; a term reads them there (:meth:`Teacher.logits`, :meth:`Teacher.features`).

* :class:`Teacher` (Hinton et al. 2015): ``q = softmax(t / T)``, ``t`` the frozen teacher's logits
  on *its* view of the batch (the full-resolution view in cross-quality KD).
* :class:`Teachers` (several frozen teachers, e.g. You et al. 2017, "Learning from Multiple Teacher
  Networks"): ``q = sum_j w_j softmax(t_j / T)``, the weighted mean of their softened outputs
  (``w`` sums to 1; equal by default). One teacher always uses :class:`Teacher` itself.
* :class:`Peers` (Zhang et al. 2018): ``p_j = softmax(z_j / T)`` of the other students;
  ``pairwise`` gives each peer separately (DML), ``mean`` their mean (DML_e).
* :class:`Virtual` (Yuan et al. 2020, Tf-KD): ``v = p`` on the true class and ``(1 - p) / (K - 1)``
  elsewhere; ``smooth=True`` applies ``softmax(v / T)`` to these probabilities as the original code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from distillistic.core.logits import Transform
from distillistic.core.precision import at_least_float32


class Views(Protocol):
    """The batch as models see it (:class:`distillistic.data.views.Views`): one view per input size."""

    def get(self, size: int | None, channels: int,
            norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Tensor:
        """The batch ``[B, C, S, S]`` at ``size`` px (None: the full view) with ``channels`` channels, normalised
        with ``norm = (mean, std)`` when given (a model's own statistics), else with the dataset's."""
        ...


def model_view(views: Views, size: int | None, channels: int,
               norm: tuple[tuple[float, ...], tuple[float, ...]] | None) -> Tensor:
    """A model's view of the batch: ``views.get(size, channels)``, normalised with ``norm`` when the model has
    its own statistics (a timm model); the plain call otherwise, so any ``Views`` of two arguments still serves."""
    return views.get(size, channels) if norm is None else views.get(size, channels, norm)


@dataclass
class TeacherOutput:
    """A frozen teacher's outputs on one batch: its logits ``[B, K]`` (``t / T_cal``, float32 at least) and the
    maps ``{stage: tensor}`` of its tapped stages (no gradient; empty when nothing is tapped)."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class StepInputs:
    """What a signal may look at during one step (or one evaluation batch)."""

    views: Views  # the shared view (a teacher's); view 0 when each student reads its own
    labels: Tensor  # int64 [B], on the device
    logits: list[Tensor]  # each student's logits [B, K], detached
    num_classes: int
    epoch: int = 0
    index: Tensor | None = None  # int64 [B] sample indices (host), keys for the teacher-output store
    split: str = "train"  # the split the batch comes from (train, val or test)
    progress: float = 0.0  # share of training done, in [0, 1] (schedules, ramps)
    # The frozen teachers' outputs on the batch, by teacher key: filled by the teaching stage before any term runs.
    teachers: dict[str, TeacherOutput] = field(default_factory=dict)
    features: list[dict[str, Tensor]] = field(default_factory=list)  # per student: tapped maps, with gradient
    # Per student: the view it read (--peer-views independent: its own augmented view); empty: all read ``views``.
    student_views: Sequence[Views] = ()
    # A strongly augmented view of the batch (data.views.ViewMaker.strong_views), made when a term reads one.
    strong_views: Views | None = None
    # The labels [B, K] of mixed training images (--mix: λ·onehot(y) + (1 − λ)·onehot(y'); ``labels`` is y);
    # None: the images are not mixed.
    mixed_labels: Tensor | None = None

    def view_of(self, i: int) -> Views:
        """The views student ``i`` reads (and a model following it, such as its EMA copy)."""
        return self.student_views[i] if self.student_views else self.views


class Signal(Protocol):
    name: str
    pairwise: bool
    of_logits: bool  # its targets are softened logits, which a transform (logit standardisation) may change

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        """One detached ``[M, B, K]`` target per student; ``transform`` (:func:`~distillistic.core.logits.
        logit_transform`) is applied to the logits before the temperature."""
        ...

    def describe(self, temperature: float) -> str:
        """The target as a formula, e.g. ``softmax(t/20)``."""
        ...


class TeacherOutputs(Protocol):
    """Where a frozen teacher's logits may already be stored (see :mod:`distillistic.teachers.store`)."""

    stats: dict[str, int]  # batches read, computed, files written, rebuilt

    def fetch(self, inp: StepInputs) -> Tensor | None:
        """The stored logits ``[B, K]`` of the batch's samples on the device, or None if any is missing."""
        ...

    def record(self, inp: StepInputs, logits: Tensor) -> None:
        """Keep the logits ``[B, K]`` the teacher just computed for the batch's samples (in memory)."""
        ...

    def flush(self) -> None:
        """Write what was recorded completely (called outside any training step)."""
        ...


class Tapped(Protocol):
    """Forward hooks that kept a model's stage outputs (:class:`distillistic.models.taps.Taps`)."""

    def pop(self) -> dict[str, Tensor]:
        """The captured ``{stage: tensor}`` of the last forward, and a cleared store."""
        ...


def soft(symbol: str, t: float) -> str:
    """``softmax(symbol/T)``, or ``softmax(symbol)`` at T = 1."""
    return f"softmax({symbol}/{t:g})" if t != 1 else f"softmax({symbol})"


class Teacher:
    """A frozen model's softened predictions on its own view of the batch.

    With a ``store`` (:mod:`distillistic.teachers.store`) the logits of views seen by an earlier run are read
    instead of computed: the model does not run and its view of the batch is never made.
    """

    pairwise = False
    of_logits = True

    def __init__(self, model: nn.Module, view_size: int | None, channels: int,
                 store: TeacherOutputs | None = None, name: str = "teacher", key: str = "teacher",
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.view_size, self.channels, self.store, self.name = view_size, channels, store, name
        self.key = key  # its entry in the step's ``inp.teachers`` (one per teacher when there are several)
        self.norm = norm  # the (mean, std) the teacher reads its view with; None: the dataset's
        # Temperature scaling of the teacher itself (Guo et al. 2017; --teacher-calibration): t / T_cal before
        # any KD temperature. 1.0 leaves the logits bit for bit as they are.
        self.calibration_t = 1.0
        self.taps: Tapped | None = None  # hooks on the model's stages (feature methods; the model then runs live)

    def compute(self, inp: StepInputs) -> TeacherOutput:
        """Its outputs on the batch: the logits read from the store, else computed (and recorded in the store)."""
        stored = self.store.fetch(inp) if self.store is not None else None
        if stored is not None:
            return TeacherOutput(stored)
        logits = self.forward_on(inp.views)
        features = self.taps.pop() if self.taps is not None else {}
        if self.store is not None:
            self.store.record(inp, logits)
        return TeacherOutput(logits, features)

    @torch.no_grad()
    def forward_on(self, views: Views) -> Tensor:
        """The model's logits ``t / T_cal`` ``[B, K]`` (float32 at least) on its view of ``views``, in eval mode."""
        if self.model.training:  # a stray .train() must not switch BatchNorm/dropout on
            self.model.eval()
        z = self.model(model_view(views, self.view_size, self.channels, self.norm))
        return at_least_float32(z) / self.calibration_t

    def output(self, inp: StepInputs) -> TeacherOutput:
        """This step's outputs, as the teaching stage put them in ``inp.teachers``."""
        out = inp.teachers.get(self.key)
        if out is None:
            raise RuntimeError(f"no outputs of '{self.key}' in this step's inputs: the teaching stage (Teaching) "
                               "runs before any term reads a teacher")
        return out

    def logits(self, inp: StepInputs) -> Tensor:
        """This step's teacher logits ``[B, K]`` (float32 at least)."""
        return self.output(inp).logits

    def features(self, inp: StepInputs) -> dict[str, Tensor]:
        """This step's tapped maps ``{stage: tensor}`` (no gradient); needs ``taps`` and no store."""
        return self.output(inp).features

    def eval_logits(self, inp: StepInputs) -> Tensor:
        """Its logits on an evaluation batch (the teacher evaluated as a model): read from the store or computed."""
        return self.compute(inp).logits

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        """``softmax(t/T)``, or ``softmax(zscore(t)/T)`` with logit standardisation (Sun et al. 2024)."""
        t = self.logits(inp)
        q = torch.softmax((transform(t) if transform else t) / temperature, dim=-1).unsqueeze(0)
        return [q] * len(inp.logits)

    def describe(self, temperature: float) -> str:
        return soft("t", temperature)


class Teachers:
    """Several frozen teachers: the weighted mean of their softened predictions, ``sum_j w_j softmax(t_j / T)``.

    Each member is a :class:`Teacher` with its own model, view, store entry and key; ``weights``
    (one per teacher, >= 0, positive sum) are normalised to sum to 1, so the target is a distribution.
    """

    pairwise = False
    of_logits = True

    def __init__(self, teachers: list[Teacher], weights: tuple[float, ...] = (), name: str = "teachers") -> None:
        if len(teachers) < 2:
            raise ValueError("Teachers needs at least 2 teachers; use Teacher for one")
        raw = list(weights) if weights else [1.0] * len(teachers)
        if len(raw) != len(teachers) or any(w < 0 for w in raw) or sum(raw) <= 0:
            raise ValueError(f"Teachers: weights {raw} must be one per teacher, >= 0, with a positive sum")
        self.teachers, self.name = teachers, name
        self.weights = [w / sum(raw) for w in raw]

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        """One shared target ``[1, B, K]``: ``q = sum_j w_j softmax(t_j / T)`` (float32); with logit
        standardisation ``sum_j w_j softmax(zscore(t_j) / T)``, each teacher standardised on its own."""
        q: Tensor | None = None
        for teacher, w in zip(self.teachers, self.weights):
            t = teacher.logits(inp)
            p = torch.softmax((transform(t) if transform else t) / temperature, dim=-1) * w
            q = p if q is None else q + p
        assert q is not None
        return [q.unsqueeze(0)] * len(inp.logits)

    def describe(self, temperature: float) -> str:
        n = len(self.teachers)
        if all(w == self.weights[0] for w in self.weights):
            return f"mean_(j<{n}) {soft('t_j', temperature)}"
        return " + ".join(f"{w:.3g} {soft(f't_{j}', temperature)}" for j, w in enumerate(self.weights))


class Teaching:
    """The step's teaching stage: every frozen teacher's outputs on the batch, read from its store or computed,
    once, before any term runs; the terms read them from ``inp.teachers``. :meth:`flush` writes what the stores
    recorded (called by the loop outside any step)."""

    def __init__(self, teachers: Sequence[Teacher] = ()) -> None:
        self.teachers = list(teachers)

    @classmethod
    def of(cls, signal: Signal | None) -> Teaching:
        """The teaching stage of a method's teacher signal: its one teacher, its several teachers, or none."""
        if isinstance(signal, Teacher):
            return cls([signal])
        return cls(signal.teachers if isinstance(signal, Teachers) else [])

    def __call__(self, inp: StepInputs) -> None:
        inp.teachers = {t.key: t.compute(inp) for t in self.teachers}

    def flush(self) -> None:
        for t in self.teachers:
            if t.store is not None:
                t.store.flush()
