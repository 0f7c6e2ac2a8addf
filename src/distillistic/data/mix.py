"""Consistent teaching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and consistent"):
mixup or CutMix applied once per training batch, so that the teacher and every student read the same mixed
image, and the labels' term reads the mixed labels.

The mixing is torchvision's (``transforms.v2.MixUp`` / ``CutMix``: each sample is blended with the batch rolled
by one; ``λ ~ Beta(α, α)``; CutMix pastes a box of area ≈ ``1 − λ`` and corrects ``λ`` to the box's true area).
torchvision draws ``λ`` and the box from torch's global generator, which a resumed run does not restore; here
they are drawn under a generator state set from a key of the batch — the data seed, the epoch and the batch's
first sample index — so every view of a batch gets the same draw, and a run resumed in the middle of an epoch
mixes its remaining batches exactly as the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from distillistic.config import Config

__all__ = ["MIX_LIVE", "BatchMix", "batch_mix"]

# Why the teacher runs live under --mix (one line, in the log and the manifest's teacher_outputs).
MIX_LIVE = ("live: --mix gives the teacher each batch's mixed images, blends of two samples that a store keyed by "
            "sample cannot hold")


class BatchMix:
    """``kind`` (``mixup`` or ``cutmix``) with Beta parameter ``alpha``, keyed per batch by ``seed``."""

    def __init__(self, kind: str, alpha: float, num_classes: int, seed: int) -> None:
        from torchvision.transforms import v2

        if kind not in ("mixup", "cutmix") or alpha <= 0 or num_classes < 1:
            raise ValueError(f"BatchMix: bad kind={kind!r}, alpha={alpha} or num_classes={num_classes}")
        self.kind, self.alpha, self.num_classes, self.seed = kind, alpha, num_classes, seed
        self._transform = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=alpha, num_classes=num_classes)

    def key(self, epoch: int, index: Tensor) -> int:
        """The generator seed of a batch: a hash of (seed, epoch, first sample index, batch size)."""
        text = f"{self.seed}:{epoch}:{int(index[0]) if len(index) else -1}:{len(index)}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    def params(self, epoch: int, index: Tensor, height: int, width: int) -> dict[str, Any]:
        """torchvision's draw (``lam``; for CutMix ``box`` and ``lam_adjusted``) for this batch: a pure function
        of the key (torch's global generator is left as it was)."""
        probe = torch.empty(len(index), 1, height, width)  # only its size is read
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.key(epoch, index))
            params = self._transform.make_params([probe])
        return params | {"batch_size": len(index), "labels": None}

    def images(self, x: Tensor, params: dict[str, Any]) -> Tensor:
        """The mixed batch ``[B, C, H, W]`` (a new tensor; torchvision's transform leaves ``x`` as it was)."""
        return self._transform.transform(x, params)

    def labels(self, y: Tensor, params: dict[str, Any], dtype: torch.dtype) -> Tensor:
        """The mixed labels ``[B, K]`` in ``dtype``: ``λ·onehot(y) + (1 − λ)·onehot(y rolled by one)``."""
        soft = torch.nn.functional.one_hot(y, self.num_classes).to(dtype)
        lam = params["lam_adjusted"] if self.kind == "cutmix" else params["lam"]
        return soft.roll(1, 0).mul_(1.0 - lam).add_(soft.mul(lam))

    def describe(self) -> str:
        return f"{self.kind}(α={self.alpha:g})"


def batch_mix(cfg: Config, num_classes: int) -> BatchMix | None:
    """The run's mixing (``--mix``, ``--mix-alpha``, keyed by the data seed), None for ``none``."""
    assert cfg.data_seed is not None
    return None if cfg.mix == "none" else BatchMix(cfg.mix, cfg.mix_alpha, num_classes, cfg.data_seed)
