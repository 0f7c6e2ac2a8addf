"""Arithmetic on logits shared by several methods: per-sample standardisation and a batch-mean KL.

Conventions: logits ``[B, K]``; "batchmean" = sum over classes, mean over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillistic.core.precision import at_least_float32


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
