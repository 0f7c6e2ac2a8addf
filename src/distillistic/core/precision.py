"""The arithmetic dtype of losses and signals: float32 under any autocast, float64 in an fp64 run."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` as float32, or as it is when float64 (``--precision fp64`` keeps every loss in float64).

    For float16/bfloat16/float32 inputs this is ``x.float()`` exactly (the same tensor for float32)."""
    return x if x.dtype == torch.float64 else x.float()
