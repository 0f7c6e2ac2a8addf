"""What a run costs: its students' size and speed, and the method's training compute.

The training FLOPs of a method are those of one representative step, counted by PyTorch's
:class:`~torch.utils.flop_counter.FlopCounterMode` (:mod:`distillistic.models.costs`), times the number
of steps. The counted step is a real :func:`~distillistic.training.engine.train_step` on the first
training batch, at mid-training (``progress`` 0.5, so warm-ups and ramps are on), with everything a step
does: every student's forward and backward, the teachers' forwards, the terms' adapters, EMA copies'
forwards and memory banks. Every state it touches (models, optimizers, schedules, the scaler, the terms'
state, every random generator) is saved before and restored after, so the run trains exactly as if it
had not been counted; it happens once, before the loop, which gains no branch and no host sync.

A teacher whose outputs a store serves (:mod:`distillistic.teachers.store`) does not run: its forward is
counted only for the steps where the store had to compute it (the store's ``train_misses``). FLOPs count
matrix products and convolutions only (see :mod:`distillistic.models.costs`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import resource
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distillistic.models.costs import count_flops, forward_cost, shape_cost, speed
from distillistic.training.engine import Progress, Task, TrainMeters, train_step
from distillistic.training.runtime import rng_state, set_rng_state

COUNTED_AT = 0.5  # the counted step's place in training (warm-ups and ramps are on by then)


@dataclass
class TrainCost:
    """The FLOPs of one training step and how the teachers' share of it is served."""

    step_flops: int  # the counted step (per process): a teacher that runs live (tapped) included, others not
    teacher_step_flops: list[int]  # each teacher's forward on one step's batch (per process)
    teachers: list[Any] = field(default_factory=list)  # their signals (a ``store`` attribute or none)
    live: list[bool] = field(default_factory=list)  # whether each teacher ran inside the counted step
    world_size: int = 1
    peak: dict[str, Any] = field(default_factory=dict)  # the run's peak memory (set when training ends)
    _seen: list[int] = field(default_factory=list)  # store misses already counted

    def __post_init__(self) -> None:
        self._seen = [_misses(t) for t in self.teachers]  # from here on: misses before were no training step's

    @property
    def own_step_flops(self) -> int:
        """A step's FLOPs without the teachers' forwards (the students, terms and companions)."""
        return self.step_flops - sum(f for f, live in zip(self.teacher_step_flops, self.live) if live)

    def take_teacher_flops(self, steps: int) -> int:
        """The teachers' forward FLOPs of the last ``steps`` steps (all processes): every step for a teacher
        computed live, the steps its store had to compute for a stored one."""
        total = 0
        for j, (teacher, flops) in enumerate(zip(self.teachers, self.teacher_step_flops)):
            store = getattr(teacher, "store", None)
            if store is None:
                total += flops * steps
                continue
            misses = _misses(teacher)
            total += flops * (misses - self._seen[j])
            self._seen[j] = misses
        return total * self.world_size

    def total(self, progress: Progress) -> int:
        """Training FLOPs so far (all processes): the students' part of every step plus the teachers' forwards."""
        return self.own_step_flops * progress.global_step * self.world_size + progress.teacher_flops


def _misses(signal: Any) -> int:
    """The training batches a teacher's store could not serve so far (0 without a store)."""
    store = getattr(signal, "store", None)
    return int(store.stats.get("train_misses", 0)) if store is not None else 0


class _Served:
    """A stand-in store for the counted step: the teacher's logits as if read (zeros), nothing recorded."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes, self.device = num_classes, device

    def fetch(self, inp: Any) -> torch.Tensor:
        return torch.zeros(len(inp.labels), self.num_classes, device=self.device)

    def record(self, inp: Any, logits: torch.Tensor) -> None:
        return None

    def flush(self) -> None:
        return None


def _snapshot(task: Task) -> dict[str, Any]:
    return copy.deepcopy({
        "students": [s.raw.state_dict() for s in task.students],
        "optimizers": [o.state_dict() for o in task.optimizers],
        "schedulers": [s.state_dict() for s in task.schedulers],
        "scaler": task.rt.scaler.state_dict(), "objective": task.objective.state_dict(), "rng": rng_state()})


def _restore(task: Task, saved: dict[str, Any]) -> None:
    for s, state in zip(task.students, saved["students"]):
        s.raw.load_state_dict(state)
    for o, state in zip(task.optimizers, saved["optimizers"]):
        o.load_state_dict(state)
    for sched, state in zip(task.schedulers, saved["schedulers"]):
        sched.load_state_dict(state)
    task.rt.scaler.load_state_dict(saved["scaler"])
    task.objective.load_state_dict(saved["objective"])
    set_rng_state(saved["rng"])
    for o in task.optimizers:
        o.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _loader_signals_as_they_were() -> Iterator[None]:
    """Leave SIGCHLD as it was: a DataLoader with workers installs its handler once per process, and the run
    installs and removes it around the loop (:mod:`distillistic.training.run`); a batch drawn before must not."""
    chld = getattr(signal, "SIGCHLD", None)
    if chld is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(chld)
    try:
        yield
    finally:
        if signal.getsignal(chld) is not before:
            signal.signal(chld, before)
            from torch.utils.data._utils import signal_handling

            signal_handling._SIGCHLD_handler_set = False  # so that the loop's first loader installs it again


def count_step(task: Task, teachers: Sequence[Any] = ()) -> tuple[int, int]:
    """FLOPs of one real training step on the first batch, and that batch's size.

    A teacher that runs live for its tapped features (feature methods) runs in it; any other is served as
    if from a store (:class:`_Served`: it never runs, nothing is recorded) and counted apart. The task's
    state is restored afterwards.
    """
    with _loader_signals_as_they_were():
        batches = task.views.prepare(task.loaders["train"].epoch(0))
        batch = next(batches)
        getattr(batches, "close", lambda: None)()  # image-file workers end now, not when garbage-collected
    plain = dataclasses.replace(task, students=[dataclasses.replace(s, model=s.raw) for s in task.students])
    stores = [getattr(t, "store", None) for t in teachers]
    saved = _snapshot(task)
    training = [s.raw.training for s in task.students]
    try:
        for t in teachers:
            if getattr(t, "taps", None) is None:
                t.store = _Served(task.num_classes, task.rt.device)
        for s in task.students:
            s.raw.train()
        flops = count_flops(lambda: train_step(plain, batch, COUNTED_AT, TrainMeters(plain)))
    finally:
        for t, store in zip(teachers, stores):
            t.store = store
        _restore(task, saved)
        for s, mode in zip(task.students, training):
            s.raw.train(mode)
    return flops, len(batch.labels)


def measure_training(task: Task, teachers: Sequence[Any], image_size: int) -> TrainCost:
    """The :class:`TrainCost` of the task's step (``teachers``: the teacher signals, each with its ``model``)."""
    step, batch = count_step(task, teachers)
    per_teacher = [shape_cost(t.model, (t.channels, t.view_size or image_size, t.view_size or image_size))["flops"]
                   * batch for t in teachers]
    live = [getattr(t, "taps", None) is not None for t in teachers]
    return TrainCost(step, per_teacher, list(teachers), live, task.rt.world_size)


def student_cost(model: nn.Module, shape: tuple[int, int, int], batch: int, channels_last: bool = False,
                 timed: bool = True) -> dict[str, Any]:
    """A student's parameters, FLOPs and MACs per image at ``shape``, and (``timed``) its latency and throughput."""
    cost: dict[str, Any] = forward_cost(model, shape, channels_last) | {"input": list(shape)}
    if timed:  # timed without the taps of a feature method (their hooks would capture every timing call)
        cost |= speed(_without_hooks(model), shape, batch, channels_last=channels_last)
    return cost


def _without_hooks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with no forward hooks (the served model has none)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The run's peak memory: the CUDA allocator's on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_of": "cuda allocator"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
            "peak_memory_of": "process resident set (CPU)"}


def model_costs(task: Task, image_size: int, teachers: Sequence[Any] = (), timed: bool = True,
                batch: int = 256) -> dict[str, dict[str, Any]]:
    """``{name: {"cost": ...}}`` for every student, member (an EMA copy: its student's) and teacher.

    ``timed``: each distinct student architecture's latency and throughput (at ``batch``) are measured once.
    """
    out: dict[str, dict[str, Any]] = {}
    measured: dict[str, dict[str, Any]] = {}
    channels_last = bool(task.cfg.channels_last)
    for s in task.students:
        size = s.view_size or image_size
        shape = (s.channels, size, size)
        key = f"{type(s.raw).__name__}:{shape}:{sum(p.numel() for p in s.raw.parameters())}"
        if key not in measured:
            measured[key] = student_cost(s.raw, shape, batch, channels_last, timed)
            s.features()  # the counting forwards' tapped maps (feature methods) are no step's
        out[s.name] = {"cost": measured[key]}
    by_name = {s.name: out[s.name] for s in task.students}
    for m in task.members:
        out[m.name] = dict(by_name.get(m.follows or "", {}))
    names = [m.name for m in task.teachers]
    for name, t in zip(names, teachers):
        size = t.view_size or image_size
        out[name] = {"cost": shape_cost(t.model, (t.channels, size, size)) | {"input": [t.channels, size, size]}}
    return out
