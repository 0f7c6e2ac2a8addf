"""DOT against a float64 transcription of mdistiller's DistillationOrientedTrainer and its KD loss.

Reference: megvii-research/mdistiller, commit a08d46f10d6102bd6e3f258ca5ac880b020ea259: ``mdistiller/engine/dot.py``
(the ``dot`` function, ``step_kd`` and ``step``), ``mdistiller/engine/trainer.py`` (``DOT.train_iter``: backward of
``loss_kd`` with ``retain_graph``, ``step_kd``, ``zero_grad``, backward of ``loss_ce``, ``step``) and
``mdistiller/distillers/KD.py`` (``kd_loss``; CE weight 0.1, KD weight 0.9, T 4 from ``engine/cfg.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _util import tiny
from distillistic.core.signals import StepInputs, model_view
from distillistic.errors import UserError
from distillistic.methods.dot import DistillationOrientedSGD
from distillistic.training import setup
from distillistic.training.engine import TrainMeters, train_step
from distillistic.training.optim import SplitGradients
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime

pytestmark = pytest.mark.unit
TOL = 1e-10


def _check_in(t: Tensor, items: list[Tensor]) -> bool:
    return any(t is i for i in items)


class RefDOT:
    """``DistillationOrientedTrainer`` (dot.py lines 58-174), one parameter group, dampening 0."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, momentum_kd: float,
                 weight_decay: float) -> None:
        self.params, self.lr, self.momentum, self.momentum_kd, self.wd = params, lr, momentum, momentum_kd, weight_decay
        self.state: dict[int, dict[str, Tensor]] = {id(p): {} for p in params}
        self.kd_grad_buffer: list[Tensor] = []
        self.kd_grad_params: list[nn.Parameter] = []
        self.kd_momentum_buffer: list[Tensor | None] = []

    @torch.no_grad()
    def step_kd(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        self.kd_momentum_buffer = [self.state[id(p)].get("momentum_kd_buffer") for p in with_grad]
        self.kd_grad_buffer = [p.grad for p in with_grad]  # type: ignore[misc]
        self.kd_grad_params = with_grad

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        d_p_list = [p.grad for p in params]
        bufs = [self.state[id(p)].get("momentum_buffer") for p in params]
        for i, param in enumerate(params):  # dot(), lines 27-42
            d_p = d_p_list[i]
            if self.wd != 0:
                d_p = d_p.add(param, alpha=self.wd)  # type: ignore[union-attr]
            if self.momentum != 0:
                buf = bufs[i]
                if buf is None:
                    buf = torch.clone(d_p).detach()  # type: ignore[arg-type]
                    bufs[i] = buf
                elif _check_in(param, self.kd_grad_params):
                    buf.mul_(self.momentum).add_(d_p, alpha=1)  # type: ignore[arg-type]
                else:
                    buf.mul_((self.momentum_kd + self.momentum) / 2.0).add_(d_p, alpha=1)  # type: ignore[arg-type]
                d_p = buf
            param.add_(d_p, alpha=-self.lr)  # type: ignore[arg-type]
        for i, (d_p, buf, p) in enumerate(zip(self.kd_grad_buffer, self.kd_momentum_buffer, self.kd_grad_params)):
            if buf is None:  # lines 44-55
                buf = torch.clone(d_p).detach()
                self.kd_momentum_buffer[i] = buf
            elif _check_in(p, params):
                buf.mul_(self.momentum_kd).add_(d_p, alpha=1)
            else:
                if self.wd != 0:
                    d_p = d_p.add(p, alpha=self.wd)
                buf.mul_((self.momentum_kd + self.momentum) / 2.0).add_(d_p, alpha=1)
            p.add_(buf, alpha=-self.lr)
        for p, b in zip(params, bufs):  # lines 164-170
            self.state[id(p)]["momentum_buffer"] = b  # type: ignore[assignment]
        for p, b in zip(self.kd_grad_params, self.kd_momentum_buffer):
            self.state[id(p)]["momentum_kd_buffer"] = b  # type: ignore[assignment]
        self.kd_grad_buffer, self.kd_grad_params, self.kd_momentum_buffer = [], [], []


def ref_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """mdistiller/distillers/KD.py ``kd_loss``."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


class _Net(nn.Module):
    """Shared layers, a parameter only the KD loss reaches and one only the CE reaches (every branch of dot())."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        self.kd_only = nn.Parameter(torch.randn(5))
        self.ce_only = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.body(x)
        return z + self.kd_only, z + self.ce_only


def _losses(net: _Net, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z_kd, z_ce = net(x)
    return 0.9 * ref_kd_loss(z_kd, t, 4.0), 0.1 * F.cross_entropy(z_ce, y)


@pytest.mark.parametrize("wd", [0.0, 5e-4, 0.1])
@pytest.mark.parametrize(("momentum", "delta"), [(0.9, 0.075), (0.9, 0.0), (0.5, 0.5)])
def test_optimizer_matches_the_reference(wd: float, momentum: float, delta: float) -> None:
    torch.manual_seed(0)
    ours = _Net().double()
    theirs = copy.deepcopy(ours)
    opt = DistillationOrientedSGD(ours.parameters(), lr=0.3, momentum=momentum, delta=delta, weight_decay=wd)
    ref = RefDOT(list(theirs.parameters()), 0.3, momentum - delta, momentum + delta, wd)
    assert isinstance(opt, SplitGradients)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(7, 6, generator=g, dtype=torch.float64)
        t = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (7,), generator=g)
        for net, kd_step, step, zero in ((theirs, ref.step_kd, ref.step, theirs.zero_grad),
                                         (ours, opt.take_distillation_gradients, opt.step, opt.zero_grad)):
            zero(set_to_none=True)
            loss_kd, loss_ce = _losses(net, x, t, y)
            loss_kd.backward(retain_graph=True)
            kd_step()
            zero(set_to_none=True)
            loss_ce.backward()
            step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=TOL, rtol=0), name


def _dot_task(**overrides: Any) -> Any:
    settings: dict[str, Any] = dict(algo="dot", teacher="cnn", teacher_weights="random", precision="fp64",
                                    device="cpu", teacher_store="off", max_train_samples=64, batch_size=16,
                                    allow_weak_teacher=True, augment="none", scheduler="constant", lr=0.05,
                                    weight_decay=5e-4)
    cfg = setup.resolve(tiny(**(settings | overrides)))
    return build_task(cfg, resolve_runtime(cfg))[0]


def test_training_loop_steps_as_the_reference_trainer() -> None:
    """Three steps of the loop with ``--algo dot`` equal mdistiller's DOT.train_iter on a copy of the student."""
    task = _dot_task()
    student = task.students[0]
    copy_ = copy.deepcopy(student.raw)
    ref = RefDOT(list(copy_.parameters()), 0.05, 0.9 - 0.075, 0.9 + 0.075, 5e-4)
    teacher = task.teacher.raw.eval()
    meters = TrainMeters(task)
    for step, batch in zip(range(3), task.views.prepare(task.loaders["train"].epoch(0))):
        views = task.views(batch, train=True)
        x = model_view(views, student.view_size, student.channels, student.norm)
        with torch.no_grad():
            t = teacher(model_view(views, task.teacher.view_size, task.teacher.channels, task.teacher.norm))
        y = batch.labels
        copy_.zero_grad(set_to_none=True)
        z = copy_(x)
        (0.9 * ref_kd_loss(z, t, 4.0)).backward(retain_graph=True)
        ref.step_kd()
        copy_.zero_grad(set_to_none=True)
        (0.1 * F.cross_entropy(z, y)).backward()
        ref.step()
        train_step(task, batch, step / 4, meters)
        for (name, a), b in zip(student.raw.named_parameters(), copy_.parameters()):
            assert a.dtype == torch.float64
            assert torch.allclose(a, b, atol=TOL, rtol=0), (step, name)


def test_refusals() -> None:
    for overrides, key in (({"precision": "fp16"}, "precision"), ({"grad_clip": 1.0}, "grad_clip"),
                           ({"optimizer": "sgd", "nesterov": True}, "nesterov"), ({"dot_delta": 0.2}, "dot_delta")):
        with pytest.raises(UserError, match=f"config key '{key}'"):
            setup.resolve(tiny(algo="dot", **overrides))


@pytest.mark.parametrize("scale", [3.0, 100.0])
def test_loss_value_and_gradient_match_the_reference(scale: float) -> None:
    """The objective of ``--algo dot`` (its KD loss) on any student logits: mdistiller's 0.1·CE + 0.9·kd_loss."""
    task = _dot_task()
    batch = next(iter(task.views.prepare(task.loaders["train"].epoch(0))))
    b = len(batch.labels)
    z = (scale * torch.randn(b, task.num_classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    inp = StepInputs(task.views(batch, train=True), batch.labels, [z.detach()], task.num_classes, 0, batch.index)
    weights = task.objective.weights_at(0.0)
    ours = task.objective(0, z1, inp, task.objective.targets(inp), weights)["loss"]
    t = task.objective.extra[0].signal.logits(inp)
    theirs = 0.1 * F.cross_entropy(z2, batch.labels) + 0.9 * ref_kd_loss(z2, t, 4.0)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), abs=TOL, rel=TOL)
    (g1,), (g2,) = torch.autograd.grad(ours, z1), torch.autograd.grad(theirs, z2)
    assert torch.allclose(g1, g2, atol=TOL, rtol=TOL)


def test_onecycle_cycles_only_the_learning_rate_of_dot() -> None:
    """OneCycle cycles momentum only for an optimizer that has one: DOT's two momenta stay mu -+ delta."""
    task = _dot_task(scheduler="onecycle")
    group = task.optimizers[0].param_groups[0]
    before = (group["momentum_task"], group["momentum_kd"], group["lr"])
    train_step(task, next(iter(task.views.prepare(task.loaders["train"].epoch(0)))), 0.0, TrainMeters(task))
    assert (group["momentum_task"], group["momentum_kd"]) == pytest.approx((0.825, 0.975))
    assert before[:2] == (group["momentum_task"], group["momentum_kd"])
    assert group["lr"] != before[2]  # the learning rate does cycle
