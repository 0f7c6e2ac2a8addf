"""Arithmetic on logits shared by several methods: per-sample standardisation and a batch-mean KL.

Logit standardisation has one switch, :func:`logit_transform`: a term built with it applies the transform it
returns to the student's logits and hands it to its signal, which applies it to the teacher's or the peers'
logits before the temperature (``Signal.targets(inp, T, transform)``).

Conventions: logits ``[B, K]``; "batchmean" = sum over classes, mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distillistic.core.precision import at_least_float32

Transform = Callable[[Tensor], Tensor] | None  # applied to logits [..., K] before the temperature; None: as they are


def kl_batchmean(q: Tensor, log_q: Tensor, log_p: Tensor) -> Tensor:
    """``(1/B) sum_b sum_c q (log q - log p)``; ``xlogy``-style: a class with ``q = 0`` contributes exactly 0."""
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1).mean()


def standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each sample's logits (Sun et al. 2024, CVPR, eq. 9): ``(z − mean_k z) / (eps + std_k z)``.

    As the reference (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``): the unbiased
    (Bessel, ``K − 1``) standard deviation and ``eps = 1e-7`` added to it. ``[B, K]``, ``K >= 2`` → ``[B, K]``
    float32 (float64 stays float64). The one standardisation every method uses (teacher, peers and student alike).
    """
    z = at_least_float32(z)
    std, mean = torch.std_mean(z, dim=-1, keepdim=True)
    return (z - mean) / (eps + std)


def logit_transform(standardized: bool) -> Transform:
    """The one switch of logit standardisation (``--logit-standardize``): :func:`standardize` or None (the logits
    as they are), applied alike to the student's, the teacher's and the peers' logits."""
    return standardize if standardized else None
