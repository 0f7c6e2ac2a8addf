"""The standard CIFAR augmentation, batched on the device: random crop with zero padding, horizontal flip.

``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()`` (He et al. 2016, "Deep Residual Learning",
sec. 4.2; the CIFAR protocol of CRD and mdistiller). Per sample, the crop offsets ``(dy, dx)`` in
``[0, 2 * padding]`` and the flip are drawn from the counter-based hash of ``(data_seed, epoch, index,
stream)`` (:mod:`distillistic.data.augment`), so a view is a pure function of its key, whatever batch it
falls in; the whole batch is then cut with one gather.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.data.augment import SampleKeys

# Hash streams (RandAugment uses 0..2*num_ops-1, RandomResizedCrop 64..103).
CROP_Y_STREAM, CROP_X_STREAM, FLIP_STREAM = 128, 129, 130
CROP_FLIP_VERSION = 1


class BatchCropFlip:
    """Zero-pad by ``padding``, crop back to the input size at a keyed offset, flip with probability 1/2."""

    def __init__(self, padding: int = 4) -> None:
        self.padding = padding

    def describe(self) -> dict[str, Any]:
        """The parameters that decide every view (part of the teacher-output store's key)."""
        return {"name": "crop_flip", "padding": self.padding, "fill": 0, "version": CROP_FLIP_VERSION}

    def params(self, keys: SampleKeys) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: top offset ``[B]``, left offset ``[B]`` in ``[0, 2 * padding]``, flip ``[B]`` (bool); host."""
        n = 2 * self.padding + 1
        return (keys.randint(CROP_Y_STREAM, n), keys.randint(CROP_X_STREAM, n),
                keys.randint(FLIP_STREAM, 2).bool())

    def __call__(self, img: Tensor, keys: SampleKeys) -> Tensor:
        """``img``: uint8 ``[B, C, H, W]`` on any device -> the augmented batch, same shape and dtype."""
        b, _, h, w = img.shape
        dy, dx, flip = (t.to(img.device, non_blocking=True) for t in self.params(keys))
        padded = F.pad(img, [self.padding] * 4)  # zeros, as RandomCrop's default fill
        rows = dy[:, None] + torch.arange(h, device=img.device)  # [B, H]
        cols = torch.arange(w, device=img.device).expand(b, w)
        cols = dx[:, None] + torch.where(flip[:, None], cols.flip(1), cols)  # [B, W]
        batch = torch.arange(b, device=img.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()
