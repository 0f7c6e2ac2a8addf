"""The arithmetic dtype of losses and signals: float32 under any autocast, float64 in an fp64 run.

Above ``PRECISE_ABOVE_T`` a softened distribution is nearly uniform and float32 cancellation, amplified by the
``T²`` factor of a KD loss, would dominate it: every KL at such a temperature is computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

PRECISE_ABOVE_T = 20.0  # the largest temperature in common use (KD's default); above it, float64


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` as float32, or as it is when float64 (``--precision fp64`` keeps every loss in float64).

    For float16/bfloat16/float32 inputs this is ``x.float()`` exactly (the same tensor for float32)."""
    return x if x.dtype == torch.float64 else x.float()


def loss_dtype(x: Tensor, temperature: float = 1.0) -> torch.dtype:
    """The dtype a loss on ``x`` at ``temperature`` computes in: float64 for a float64 ``x`` or above
    ``PRECISE_ABOVE_T``, else float32 (whatever the autocast)."""
    return torch.float64 if x.dtype == torch.float64 or temperature > PRECISE_ABOVE_T else torch.float32
