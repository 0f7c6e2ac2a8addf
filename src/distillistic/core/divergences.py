"""Divergences between a teaching signal and a student, with the temperature scaling decided here.

For a target ``q`` ``[M, B, K]`` (``M`` distributions per sample, e.g. DML's ``N - 1`` peers) and student
logits ``z`` ``[B, K]`` at temperature ``T``, with ``p = softmax(z / T)``::

    D(q || z; T) = T^2 * (1 / (M B)) * sum_{m, b} d(q_mb, p_b)

* "batchmean": sum over classes, mean over the batch (and over the ``M`` targets);
* the factor ``T^2`` keeps the gradient's magnitude comparable to the CE term as ``T`` changes
  (Hinton et al. 2015, sec. 2): ``dD/dz_b = (T / B) (p_b - q_b)`` for KL.

``kl``: ``d = sum_c q_c (log q_c - log p_c)`` (equals ``F.kl_div(log p, q, reduction="batchmean")``);
``js``: Jensen-Shannon, ``(KL(q || m) + KL(p || m)) / 2`` with ``m = (p + q) / 2``;
``mse``: ``sum_c (p_c - q_c)^2`` on probabilities (not on logits, which KD_Lib used for DML).
Targets are always detached; all arithmetic is float32 whatever the autocast context, and float64 above
``PRECISE_ABOVE_T`` (where ``p`` and ``q`` are both nearly uniform and float32 cancellation, amplified by
``T^2``, would otherwise dominate). KL and JS are >= 0 by definition: a negative rounding residue (only
possible when ``q`` and ``p`` nearly coincide) is clamped to 0, which leaves every positive value, and its
gradient, bit for bit as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.core.precision import PRECISE_ABOVE_T as PRECISE_ABOVE_T
from distillistic.core.precision import loss_dtype
from distillistic.registry import Registry

Divergence = Callable[[Tensor, Tensor, float], Tensor]
DIVERGENCES: Registry[Divergence] = Registry("divergence")
SYMBOLS = {"kl": "KL", "js": "JS", "mse": "MSE"}


def _prepare(q: Tensor, z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    # float32 whatever the autocast; float64 in a float64 run, and above PRECISE_ABOVE_T (see the docstring).
    dtype = loss_dtype(z, temperature)
    q = q.detach().to(dtype)
    if q.dim() == 2:
        q = q.unsqueeze(0)
    return q, F.log_softmax(z.to(dtype) / temperature, dim=-1)


def _nonnegative(value: Tensor) -> Tensor:
    """``value`` shown as at least 0 (rounding can make a divergence of near-equal distributions slightly
    negative) without cutting its gradient: a clamp would zero the gradient exactly where it is needed."""
    return value + (value.clamp_min(0) - value).detach()


def _finish(value: Tensor, z: Tensor) -> Tensor:
    """Back to the run's loss dtype: float32, or float64 in a float64 run (a no-op in the common range)."""
    want = torch.float64 if z.dtype == torch.float64 else torch.float32
    return value if value.dtype == want else value.to(want)


@DIVERGENCES.register("kl")
def kl(q: Tensor, z: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(q || softmax(z / T))``, batchmean. ``q``: ``[M, B, K]`` or ``[B, K]``; ``z``: ``[B, K]``."""
    q, logp = _prepare(q, z, temperature)
    per_sample = (torch.xlogy(q, q) - q * logp).sum(dim=-1)  # [M, B]
    return _finish(_nonnegative(temperature**2 * per_sample.mean()), z)


@DIVERGENCES.register("js")
def js(q: Tensor, z: Tensor, temperature: float) -> Tensor:
    """``T^2 * JS(q, softmax(z / T))``, batchmean."""
    q, logp = _prepare(q, z, temperature)
    p = logp.exp().expand_as(q)
    log_m = torch.log(((p + q) / 2).clamp_min(torch.finfo(q.dtype).tiny))
    kl_qm = (torch.xlogy(q, q) - q * log_m).sum(dim=-1)
    kl_pm = (p * (logp - log_m)).sum(dim=-1)
    return _finish(_nonnegative(temperature**2 * ((kl_qm + kl_pm) / 2).mean()), z)


@DIVERGENCES.register("mse")
def mse(q: Tensor, z: Tensor, temperature: float) -> Tensor:
    """``T^2 * sum_c (softmax(z / T)_c - q_c)^2``, batchmean."""
    q, logp = _prepare(q, z, temperature)
    return _finish(temperature**2 * ((logp.exp() - q) ** 2).sum(dim=-1).mean(), z)
