"""PCL's temporal mean teachers (Wu & Gong 2021, AAAI, Peer Collaborative Learning for Online KD).

Student ``i`` learns from the mean of the *other* students' EMA copies' predictions (each copy on its student's
view of the batch; with ``--peer-views independent`` each student reads its own augmented view, as PCL's peers
do), the copies' decay warmed up as mean teacher's ``min(1 − 1/(n + 1), d)``, the consistency weight ramped up as
mean teacher's ``exp(−5 (1 − p/p_r)²)``::

    L_i = CE(z_i, y) + r(p) · T² · KL(mean_(j≠i) softmax(z'_j / T) ‖ softmax(z_i / T))

Only the temporal-mean part of PCL is implemented (no multi-branch peer ensemble teacher). No official code was
published; the mean-teacher code it builds on (Tarvainen & Valpola 2017: ``ramps.sigmoid_rampup``,
``update_ema_variables``) and shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation are followed.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.divergences import DIVERGENCES, SYMBOLS
from distillistic.core.ema import EmaCopies
from distillistic.core.objective import Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs
from distillistic.errors import UserError
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import MethodSpec, Param, Setting, decay, share, uniform

SPEC = MethodSpec(
    "pcl", "Wu & Gong 2021, Peer Collaborative Learning for Online Knowledge Distillation (AAAI): "
           "temporal mean teachers",
    "L_i = CE(z_i, y) + r(p) T² KL(mean_(j≠i) softmax(z'_j/T) ‖ softmax(z_i/T)), z'_j = EMA of student j",
    family="cohort", min_students=2, default_students=2, temperature=3.0, composition="sum", weights=("pcl_rampup",),
    reads=("temperature", "divergence"),
    defaults=(
        Setting("pcl_rampup", "Wu & Gong 2021: mean teacher's sigmoid ramp-up",
                "shaoeric/Peer-Collaborative-Learning…, train.py: over 80 of 300 epochs (0.27)",
                "0.25 of training (close to the re-implementation's 0.27; no official code)"),
    ),
    params=(
        Param("pcl_decay", float, 0.999, "EMA decay of each student's temporal mean teacher, in (0, 1)",
              cite="Wu & Gong 2021, sec. 4.1 (0.999, as mean teacher)", range=decay(),
              allowed="an EMA decay in (0, 1), e.g. 0.999", space=uniform(0.99, 0.9999)),
        Param("pcl_rampup", float, 0.25, "share of training over which the consistency weight ramps up, in [0, 1]",
              cite="shaoeric/Peer-Collaborative-Learning…, train.py: lambd rampup over 80 of 300 epochs (0.27)",
              range=share(closed=True), allowed="a share of training in [0, 1]", space=uniform(0.0, 0.5)),
    ))


def sigmoid_rampup(progress: float, rampup: float) -> float:
    """Consistency weight ramp-up ``exp(−5·(1 − t/t_r)²)`` for ``t < t_r``, 1 after (mean teacher, used by PCL).

    Same as mean-teacher's ``ramps.sigmoid_rampup`` (``t`` clipped to ``[0, t_r]``, ``t_r = 0`` → 1). Note: the
    public PCL re-implementation divides by the weight (``1 − epoch / lambd``) instead of ``t_r``, a bug.
    """
    if rampup <= 0:
        return 1.0
    phase = 1.0 - min(max(progress, 0.0), rampup) / rampup
    return math.exp(-5.0 * phase * phase)


def peer_mean_target(ema_logits: Tensor, temperature: float) -> Tensor:
    """PCL's peer mean teacher: row ``i`` is ``mean_{j≠i} softmax(z'_j / T)``. ``[M, B, K]`` → ``[M, B, K]``, M ≥ 2.

    One KL to this mean gives the same gradient as the mean of the ``M − 1`` KLs that the PCL re-implementation
    sums (DESIGN.md, section 3); the loss values differ by the peers' entropies. Each row is averaged from its
    own ``M − 1`` terms rather than ``(Σ_j p_j − p_i)/(M − 1)``, which cancels catastrophically on small entries.
    """
    probs = F.softmax(at_least_float32(ema_logits.detach()) / temperature, dim=-1)
    m = probs.shape[0]
    if m < 2:
        raise ValueError("a peer mean needs at least two members")
    return torch.stack([torch.cat([probs[:i], probs[i + 1 :]]).mean(dim=0) for i in range(m)])


class TemporalMeanPeers(Term):
    """PCL's peer mean teacher: ``r(p)·T²·D(mean_(j≠i) softmax(z'_j/T) ‖ softmax(z_i/T))`` (module docstring).

    ``means``: the students' EMA copies it reads, a companion of the objective (which binds, updates, evaluates
    and checkpoints them); the term only reads their logits.
    """

    def __init__(self, means: EmaCopies, temperature: float, rampup: float, divergence: str = "kl",
                 name: str = "pcl") -> None:
        super().__init__(name, weight=1.0, distil=True, ramp=lambda progress: sigmoid_rampup(progress, rampup))
        self.temperature, self.rampup, self.divergence = temperature, rampup, divergence
        self.companions = (means,)  # a plain tuple: the objective owns the copies
        self._fn = DIVERGENCES.get(divergence)

    @property
    def means(self) -> EmaCopies:
        """The EMA copies of the students (the term's one companion)."""
        return typing.cast(EmaCopies, self.companions[0])

    def targets(self, inp: StepInputs) -> list[Tensor]:
        """``q_i = mean_(j≠i) softmax(z'_j / T)``, one ``[1, B, K]`` per student (detached)."""
        q = peer_mean_target(self.means.logits(inp), self.temperature)
        return [q[i : i + 1] for i in range(q.shape[0])]

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        assert target is not None
        return self._fn(target, z, self.temperature)

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        d = SYMBOLS.get(self.divergence, self.divergence.upper())
        scale, peer, me = (f"{t}²·", f"softmax(z'_j/{t})", f"softmax(z/{t})") if self.temperature != 1 else (
            "", "softmax(z'_j)", "softmax(z)")
        return (f"r(p)·{scale}{d}(mean_(j≠i) {peer} ‖ {me}), z'_j = EMA({self.means.decay:g}) of student j, "
                f"r ramping up over {self.rampup:.0%} of training")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    if cfg.ema is not None:
        raise UserError(f"--ema {cfg.ema:g} with algo pcl: pcl keeps an EMA copy of every student already "
                        "(its decay is --pcl-decay); drop --ema")
    assert cfg.temperature is not None, "resolve the config first"
    means = EmaCopies(cfg.pcl_decay, suffix="ema", warmup=True)
    return (TemporalMeanPeers(means, cfg.temperature, cfg.pcl_rampup, cfg.divergence),)


register_method(SPEC, terms)
