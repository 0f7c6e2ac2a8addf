"""DOT, the distillation-oriented trainer (Zhao et al. 2023, ICCV): KD trained by SGD with one momentum for the
task loss's gradient and a larger one for the distillation loss's.

The loss is mdistiller's KD, ``L = c·CE(z, y) + d·T²·KL(softmax(t/T) ‖ softmax(z/T))`` (c = 0.1, d = 0.9, T = 4);
the method is in the optimizer. Per parameter ``θ`` with task gradient ``g`` and distillation gradient ``h``::

    b ← (μ − δ)·b + g + λθ,   θ ← θ − η·b;   b_kd ← (μ + δ)·b_kd + h,   θ ← θ − η·b_kd

(first step: ``b = g + λθ``, ``b_kd = h``; a parameter with only one of the two gradients uses the mean momentum
μ for it). Reference: megvii-research/mdistiller, ``mdistiller/engine/dot.py`` (``DistillationOrientedTrainer``)
and ``mdistiller/engine/trainer.py`` (class ``DOT``: backward of the KD loss, ``step_kd``, backward of the CE,
``step``).

How it runs here, without a branch on the method in the training loop: the method registers an ``optimizer``
hook (:class:`~distillistic.methods.registry.Method`) that builds :class:`DistillationOrientedSGD` for each
student instead of ``--optimizer``'s; the loop asks every optimizer that has ``take_distillation_gradients``
(:class:`distillistic.training.optim.SplitGradients`) for the two gradients apart: a backward of the
distillation terms (``Term.distil``), ``take_distillation_gradients()``, then a backward of the rest and
``step()``. It reads ``--lr``, ``--momentum`` (μ) and ``--weight-decay`` (λ); mdistiller's CIFAR-100 setting is
``--lr 0.05 --momentum 0.9 --weight-decay 5e-4 --scheduler multistep --milestones 150,180,210`` (240 epochs,
batch 64). Under ``--scheduler onecycle`` only the learning rate cycles (the momenta stay μ ∓ δ). Not with
fp16 (its gradient scaler), ``--grad-clip``, ``--nesterov`` or several processes (torchrun): refused; so is an
explicit ``--optimizer`` other than ``sgd`` (mdistiller's ``DOT.init_optimizer`` raises for any other solver; the
default ``adamw``, left unset, still trains a teacher trained first).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.objective import CrossEntropy, Distill, Term
from distillistic.errors import ConfigError, UserError
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import MethodSpec, Param, Setting, at_least, uniform

_MDISTILLER = "megvii-research/mdistiller @a08d46f"
SPEC = MethodSpec(
    "dot", "Zhao et al. 2023, DOT: A Distillation-Oriented Trainer (ICCV)",
    "L = c CE(z, y) + d T² KL(softmax(t/T) ‖ softmax(z/T)), trained by SGD with momentum μ - δ for the CE's "
    "gradient and μ + δ for the KD's",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=4.0, composition="sum",
    optimizer="sgd",  # mdistiller's DOT trainer raises NotImplementedError for any other SOLVER.TYPE
    weights=("dot_ce_weight", "dot_kd_weight"), reads=("temperature",),
    notes=f"T = 4, CE 0.1, KD 0.9: mdistiller's KD (mdistiller/engine/cfg.py lines 61-64, {_MDISTILLER}), which "
          "configs/cifar100/dot/*.yaml train with DOT; lr, momentum and weight decay are the run's",
    defaults=(
        Setting("dot_delta", "not read here", f"{_MDISTILLER}, configs/cifar100/dot/*.yaml: DELTA 0.075; "
                "imagenet/r34_r18/dot.yaml: 0.09", "the code's CIFAR-100 value"),
        Setting("dot_ce_weight", "—", f"{_MDISTILLER}, mdistiller/engine/cfg.py:63 CE_WEIGHT 0.1 (KD's, which the "
                "DOT configs train)"),
        Setting("dot_kd_weight", "—", f"{_MDISTILLER}, mdistiller/engine/cfg.py:64 KD_WEIGHT 0.9"),
        Setting("temperature", "—", f"{_MDISTILLER}, mdistiller/engine/cfg.py:61 TEMPERATURE 4", ours="4"),
    ),
    params=(
        Param("dot_delta", float, 0.075, "momentum gap delta: the CE's gradient at momentum - delta, the KD's at "
              "momentum + delta", cite=f"{_MDISTILLER}, configs/cifar100/dot/res32x4_res8x4.yaml: DOT.DELTA 0.075 "
              "(ImageNet r34_r18: 0.09)", range=at_least(0.0), allowed="a number >= 0 (momentum + delta below 1)",
              space=uniform(0.0, 0.09)),
        Param("dot_ce_weight", float, 0.1, "weight c of the cross-entropy", cite=f"{_MDISTILLER}, "
              "mdistiller/engine/cfg.py line 63: CFG.KD.LOSS.CE_WEIGHT = 0.1", range=at_least(0.0),
              allowed="a weight >= 0", space=uniform(0.05, 1.0)),
        Param("dot_kd_weight", float, 0.9, "weight d of the KD term", cite=f"{_MDISTILLER}, "
              "mdistiller/engine/cfg.py line 64: CFG.KD.LOSS.KD_WEIGHT = 0.9", range=at_least(0.0),
              allowed="a weight >= 0", space=uniform(0.1, 2.0)),
    ))


class DistillationOrientedSGD(torch.optim.Optimizer):
    """SGD with a momentum buffer for the task gradient and one for the distillation gradient (module docstring).

    Call ``take_distillation_gradients()`` after the distillation loss's backward (it keeps each ``p.grad``), then,
    after the task loss's backward, ``step()``. Both buffers live in ``state`` (checkpointed with it).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float, delta: float,
                 weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, momentum_task=momentum - delta, momentum_kd=momentum + delta,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DistillationOrientedSGD takes one group of parameters (as the reference)")
        self._kd: list[tuple[nn.Parameter, Tensor]] = []

    @torch.no_grad()
    def take_distillation_gradients(self) -> None:
        """Keep the current gradients as the distillation gradients (the reference's ``step_kd``)."""
        self._kd = [(p, p.grad) for p in self.param_groups[0]["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """The task update with ``p.grad``, then the distillation update (the reference's ``dot``)."""
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        m_task, m_kd = group["momentum_task"], group["momentum_kd"]
        task = [p for p in group["params"] if p.grad is not None]
        task_ids, kd_ids = {id(p) for p in task}, {id(p) for p, _ in self._kd}
        for p in task:
            d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if m_task == 0:  # the reference keeps no task buffer then, for any parameter
                p.add_(d_p, alpha=-lr)
            else:
                self._update(p, "momentum_buffer", d_p, m_task if id(p) in kd_ids else (m_kd + m_task) / 2, lr)
        for p, d_p in self._kd:
            both = id(p) in task_ids
            if not both and wd != 0 and "momentum_kd_buffer" in self.state[p]:
                d_p = d_p.add(p, alpha=wd)
            self._update(p, "momentum_kd_buffer", d_p, m_kd if both else (m_kd + m_task) / 2, lr)
        self._kd = []

    def _update(self, p: nn.Parameter, key: str, d_p: Tensor, momentum: float, lr: float) -> None:
        """``buf ← momentum·buf + d_p`` (``buf = d_p`` the first time), then ``p ← p − lr·buf``."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.clone(d_p).detach()
        else:
            state[key].mul_(momentum).add_(d_p)
        p.add_(state[key], alpha=-lr)


def optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Each student's :class:`DistillationOrientedSGD` (lr, momentum and weight decay from the run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise UserError("algo dot runs in one process: its optimizer takes two backward passes a step, which "
                        "DistributedDataParallel does not; run it without torchrun")
    wd = cfg.weight_decay if cfg.weight_decay is not None else 0.0
    return DistillationOrientedSGD([p for p in params if p.requires_grad], cfg.lr, cfg.momentum, cfg.dot_delta, wd)


def check_config(cfg: Config) -> None:
    if cfg.momentum + cfg.dot_delta >= 1 or cfg.momentum - cfg.dot_delta < 0:
        raise ConfigError("dot_delta", cfg.dot_delta, f"a gap that keeps momentum {cfg.momentum:g} - delta >= 0 and "
                                                      f"momentum + delta < 1")
    for key, bad, why in (("precision", cfg.precision == "fp16", "fp32, bf16 or fp64 (fp16's gradient scaler "
                                                                  "does not see DOT's two gradients)"),
                          ("grad_clip", cfg.grad_clip is not None, "unset (DOT's two gradients are not clipped)"),
                          ("nesterov", cfg.nesterov, "false (DOT's momenta are heavy-ball, as the reference)")):
        if bad:
            raise ConfigError(key, getattr(cfg, key), f"{why} for algo dot")


class DOTKD(Distill):
    """mdistiller's KD term, its description saying which momenta train it."""

    def __init__(self, ctx: Context, cfg: Config) -> None:
        assert ctx.teacher is not None, "resolve the config first"
        assert cfg.temperature is not None, "resolve the config first"
        super().__init__("kd", ctx.teacher, "kl", cfg.temperature, weight=cfg.dot_kd_weight)
        self.momenta = (cfg.momentum - cfg.dot_delta, cfg.momentum + cfg.dot_delta)

    def describe(self) -> str:
        task, kd = self.momenta
        return f"{super().describe()} [DOT: SGD momentum {task:.3g} for CE's gradient, {kd:.3g} for KD's]"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return (DOTKD(ctx, cfg),)


def supervised(cfg: Config) -> Term:
    return CrossEntropy(cfg.dot_ce_weight)


register_method(SPEC, terms, supervised=supervised, optimizer=optimizer, check_config=check_config)
