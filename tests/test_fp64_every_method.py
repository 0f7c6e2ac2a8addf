"""``--precision fp64`` keeps every loss in float64: one training step of every registered method, watched op by op.

A ``TorchDispatchMode`` sees every tensor the step's loss computes: the students' and teachers' forwards, each
term's targets and loss, and the backward. Any floating tensor that is not float64 is a cast somewhere in a method
(a ``.float()``, a ``torch.full`` without dtype, a buffer left in float32). The optimizer's own step counters and
the training meters (accuracy, entropy: reporting, not the loss) are left out. The methods come from the registry,
so a newly registered method is covered without another line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from _util import tiny
from distillistic.methods.registry import METHODS, Method
from distillistic.training import setup
from distillistic.training.engine import TrainMeters, train_step
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime


class NotFloat64(TorchDispatchMode):
    """Records each op that returns a floating tensor of another dtype than float64: ``{op: dtype}``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, str] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.found.setdefault(str(func), str(t.dtype))
        return out


def _unwatched(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return call


def _settings(method: Method) -> dict[str, Any]:
    """The smallest fp64 run of a method on ``digits`` (teachers ``cnn`` with random weights)."""
    out: dict[str, Any] = dict(algo=method.name, precision="fp64", device="cpu", teacher_store="off",
                               max_train_samples=64, batch_size=16, allow_weak_teacher=True)
    if method.needs_teacher:
        out["teacher_weights"] = "random"
        if method.spec.default_teacher is not None:
            out["teacher"] = "cnn"
    if method.min_students > 1:
        out["students"] = method.min_students
    if "crd_negatives" in method.params:
        out["crd_negatives"] = 8
    return out


def _methods() -> list[str]:
    return [n for n in METHODS.names() if not METHODS.get(n).spec.generations]  # ban: kd runs, covered by kd


@pytest.mark.parametrize("algo", [*_methods(), "kd+ls", "dkd+ls", "dml+ls", "tfkd+smooth", "baseline+ema"])
def test_one_fp64_step_computes_nothing_below_float64(algo: str) -> None:
    name, _, variant = algo.partition("+")
    settings = _settings(METHODS.get(name))
    settings |= {"ls": {"logit_standardize": True}, "smooth": {"virtual_smooth": True},
                 "ema": {"ema": 0.9}}.get(variant, {})
    cfg = setup.resolve(tiny(**settings))
    task, _ = build_task(cfg, resolve_runtime(cfg))
    meters = TrainMeters(task)
    meters.update = _unwatched(meters.update)  # type: ignore[method-assign]
    for opt in task.optimizers:
        opt.step = _unwatched(opt.step)  # type: ignore[method-assign]
    batch = next(iter(task.views.prepare(task.loaders["train"].epoch(0))))  # as the loop: views made ahead
    watch = NotFloat64()
    with watch:
        train_step(task, batch, 0.5, meters)
    assert watch.found == {}, f"{algo} computed below float64 in an fp64 step: {watch.found}"
    assert all(p.dtype == torch.float64 for s in task.students for p in s.raw.parameters())


@pytest.mark.parametrize(("temperature", "t_max"), [(25.0, None), (15.0, 21.0)])
def test_kd_loss_computes_in_float64_above_t_20(temperature: float, t_max: float | None) -> None:
    """Above T = 20 (CTKD: T's bound 21) the KL of two near-uniform distributions is computed in float64, as
    ``core/divergences.py`` does: a float32 run gets the float64 value rounded once, not float32 cancellation."""
    from distillistic.methods.ctkd import kd_loss

    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(8, 100, generator=g) * 3, torch.randn(8, 100, generator=g) * 3
    temp = torch.tensor(temperature) if t_max is not None else temperature
    out = kd_loss(z, t, temp, t_max=t_max)
    exact = kd_loss(z.double(), t.double(), torch.tensor(temperature, dtype=torch.float64)
                    if t_max is not None else temperature, t_max=t_max)
    assert out.dtype == torch.float32
    assert exact.dtype == torch.float64
    assert torch.equal(out, exact.float())
