"""Seeded, batched data augmentation.

Every random choice about sample ``index`` in ``epoch`` is drawn from a counter-based hash of
``(data_seed, epoch, index, stream)`` instead of a stateful generator (and of ``view`` too for the second and
later views of a sample, when each student of a cohort reads its own: ``--peer-views independent``; view 0
is the shared view, bit for bit). Hence

* a view can be regenerated bit-exactly from its key alone (the teacher-output store relies on it),
  whatever the batch it falls in, the number of workers or a resume in the middle of an epoch;
* augmentation can run on whole batches, on the device, with per-sample parameters.

:class:`BatchRandAugment` is RandAugment (Cubuk et al. 2020) with torchvision's operations and
magnitudes (``num_ops=2, magnitude=9, 31 bins``, nearest interpolation, fill 0): per sample and per
slot it draws one of the 14 operations and a sign, then applies each (operation, sign) group as one
batched call, so a batch costs a few dozen kernel launches instead of a Python loop over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# Streams: RandAugment slot s uses 2s (operation) and 2s+1 (sign); crops use 64 + 4 * attempt + k.
CROP_STREAM = 64
# Bump when any view a key produces changes (the teacher-output store keys its entries with it).
AUGMENT_VERSION = 1


def _mul32(x: Tensor, m: int) -> Tensor:
    """``(x * m) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    hi, lo = m >> 16, m & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (the "lowbias32" hash): a bijection with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key_hash(data_seed: int, epoch: int, stream: int, view: int) -> int:
    """The per-batch part of the hash: ``(data_seed, epoch[, view], stream)``; view 0 leaves it as it always was."""
    h = _mix32_int((_mix32_int(data_seed & _M32) ^ (epoch & _M32)) + _GOLDEN & _M32)
    if view:
        h = _mix32_int((h ^ (view & _M32)) + _GOLDEN & _M32)
    return _mix32_int((h ^ (stream & _M32)) + _GOLDEN & _M32)


def sample_hash(data_seed: int, epoch: int, index: Tensor, stream: int, view: int = 0) -> Tensor:
    """Hash of ``(data_seed, epoch, index, stream)`` (and ``view`` when > 0) in [0, 2**32), one per element of
    ``index``.

    ``index`` is an int64 tensor of sample indices ``[B]``; the result has the same shape and device.
    """
    x = (index.to(torch.int64) & _M32) ^ _key_hash(data_seed, epoch, stream, view)
    return _mix32(_mix32(x) + _GOLDEN & _M32)


def sample_hash_int(data_seed: int, epoch: int, index: int, stream: int, view: int = 0) -> int:
    """Scalar twin of :func:`sample_hash`, for per-sample work in data-loading workers."""
    x = (index & _M32) ^ _key_hash(data_seed, epoch, stream, view)
    return _mix32_int(_mix32_int(x) + _GOLDEN & _M32)


def uniform_int(data_seed: int, epoch: int, index: int, stream: int, view: int = 0) -> float:
    """A uniform float in [0, 1) for one sample (24 bits, exactly representable)."""
    return (sample_hash_int(data_seed, epoch, index, stream, view) >> 8) / float(1 << 24)


@dataclass(frozen=True)
class SampleKeys:
    """What identifies a batch's views: the data seed, the epoch, each sample's index ``[B]`` and which view of
    the samples (0: the shared one; student ``m`` of a cohort with independent views reads view ``m``)."""

    data_seed: int
    epoch: int
    index: Tensor  # int64 [B], on the host
    view: int = 0

    def randint(self, stream: int, n: int) -> Tensor:
        """Per-sample integers in [0, n) ``[B]`` (host tensor)."""
        return sample_hash(self.data_seed, self.epoch, self.index, stream, self.view) % n


def equalize(img: Tensor) -> Tensor:
    """Histogram equalisation of a uint8 batch ``[B, C, H, W]``, vectorised over images and channels.

    Same arithmetic as torchvision's ``F.equalize`` (which loops over images and syncs per channel):
    ``step = (pixels - count of the brightest level) // 255``; ``lut = (cumsum + step // 2) // step``
    shifted right by one level; channels with ``step == 0`` are left unchanged.
    """
    b, c, h, w = img.shape
    flat = img.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    brightest = flat.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, brightest)) // 255  # [BC, 1]
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = torch.nn.functional.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    identity = torch.arange(256, device=img.device).expand_as(lut)
    lut = torch.where(step == 0, identity, lut)
    return lut.gather(1, flat).to(torch.uint8).reshape(b, c, h, w)


class BatchRandAugment:
    """RandAugment on a uint8 batch ``[B, C, H, W]`` with per-sample choices from :class:`SampleKeys`."""

    def __init__(self, image_size: tuple[int, int], num_ops: int = 2, magnitude: int = 9,
                 num_magnitude_bins: int = 31) -> None:
        # torchvision is imported here, not at the top: a run without RandAugment (or a torchvision model) then
        # never imports it, about 0.4 s of CPU of each process's start
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.autoaugment import RandAugment, _apply_op

        self._apply_op, self._nearest = _apply_op, InterpolationMode.NEAREST
        space = RandAugment()._augmentation_space(num_magnitude_bins, image_size)
        self.ops: list[tuple[str, float, bool]] = []
        for name, (magnitudes, signed) in space.items():
            value = float(magnitudes[magnitude].item()) if magnitudes.ndim > 0 else 0.0
            self.ops.append((name, value, signed))
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins

    def describe(self) -> dict[str, Any]:
        """The parameters that decide every view (part of the teacher-output store's key)."""
        return {"name": "randaugment", "num_ops": self.num_ops, "magnitude": self.magnitude,
                "num_magnitude_bins": self.num_magnitude_bins, "interpolation": "nearest", "fill": 0,
                "version": AUGMENT_VERSION}

    def choices(self, keys: SampleKeys) -> list[tuple[Tensor, Tensor]]:
        """Per slot, the operation index ``[B]`` and sign (0: +, 1: -) ``[B]`` of every sample."""
        return [(keys.randint(2 * s, len(self.ops)), keys.randint(2 * s + 1, 2)) for s in range(self.num_ops)]

    def __call__(self, img: Tensor, keys: SampleKeys) -> Tensor:
        out = img
        for op_index, sign in self.choices(keys):
            # Sort the batch by (operation, sign), so that each group is a contiguous slice changed in
            # place: two gathers per slot instead of a gather and a scatter per group. The keys live on
            # the host, so the grouping never syncs with the device.
            code = op_index * 2 + sign
            order = torch.argsort(code, stable=True)
            counts = torch.bincount(code, minlength=2 * len(self.ops)).tolist()
            x = out.index_select(0, order.to(img.device, non_blocking=True))
            start = 0
            for c, n in enumerate(counts):
                name, value, signed = self.ops[c // 2]
                if n and name != "Identity":
                    group = x[start : start + n]
                    if name == "Equalize":
                        x[start : start + n] = equalize(group)
                    else:
                        magnitude = -value if (signed and c % 2 == 1) else value
                        x[start : start + n] = self._apply_op(group, name, magnitude, interpolation=self._nearest,
                                                              fill=None)
                start += n
            out = x.index_select(0, torch.argsort(order).to(img.device, non_blocking=True))
        return out


def crop_box(height: int, width: int, keys: tuple[int, int, int], scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3), view: int = 0) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)`` drawn from ``keys = (data_seed, epoch, index)`` (and
    ``view`` when > 0: another crop of the same sample, see :class:`SampleKeys`).

    The algorithm of ``torchvision.transforms.RandomResizedCrop.get_params`` (10 attempts, then a
    central crop), with the counter-based hash in place of the global generator.
    """
    seed, epoch, index = keys
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        u = [uniform_int(seed, epoch, index, CROP_STREAM + 4 * attempt + k, view) for k in range(4)]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
