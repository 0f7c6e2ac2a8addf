"""The device-side views of a batch: augmentation, normalisation, cross-quality downscaling.

:class:`ViewMaker` turns a uint8 :class:`~distillistic.data.loader.Batch` into :class:`Views` on the device:

* RandAugment runs batched with per-sample choices keyed by ``(data_seed, epoch, index)``;
* the cross-quality views come from *the same* augmented crop: the full view for the teacher and an
  antialiased downscale of it for the students (:meth:`Views.get`);
* grayscale data is expanded to 3 channels for models that take RGB;
* with ``views = V`` > 1 (``--peer-views independent``), each training sample has V augmented views, view
  ``v`` keyed by ``(data_seed, epoch, index, v)`` (its own crop too for image files, made by the loader):
  student ``m`` of a cohort reads view ``m`` (:meth:`ViewMaker.for_students`); view 0 is the shared view
  bit for bit, and what a teacher reads. Evaluation has one view (no augmentation);
* with ``strong``, a strongly augmented view of every training sample beside those (for a term that reads one:
  ``Term.strong_view``): the run's augmentation drawn on keys of its own (``view = STRONG_VIEW``), then
  RandAugment with 2 operations at magnitude 10 (of 31 bins), made ahead with the others
  (:meth:`ViewMaker.strong_views`); from view 0's images (image files: the loader's crop of view 0);
* with ``mix`` (``--mix mixup|cutmix``, :mod:`distillistic.data.mix`), every training view of a batch (the
  strong one too) is mixed with the same draw after augmentation and normalisation, before any downscale: the
  teacher and every student read the same mixed image, and :meth:`ViewMaker.mixed_labels` gives its labels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.data.augment import BatchRandAugment, SampleKeys
from distillistic.data.crop_flip import BatchCropFlip
from distillistic.data.loader import Batch, DataInfo
from distillistic.data.mix import BatchMix
from distillistic.errors import DataError

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel
STRONG_VIEW = 1000  # the augmentation keys' view number of the strong view (views 0, 1, ... are the run's)


class Views:
    """The float views of one batch, made on demand and cached: ``get(size, channels)``.

    Nothing is computed until a view is asked for: with a warm teacher-output store the teacher
    never asks, so its view (and, in an evaluation of the teacher alone, the batch itself) is never made.
    """

    def __init__(self, base: Tensor | Callable[[], Tensor], channels_last: bool, size: int | None = None,
                 stats: tuple[Tensor, Tensor] | None = None) -> None:
        """``base``: the full view ``[B, C, S, S]``, or a function making it on first use (then give ``size``);
        ``stats``: the (mean, std) ``[1, C, 1, 1]`` it is normalised with, for views a model wants normalised
        its own way."""
        self._base, self.channels_last, self.stats = base, channels_last, stats
        self._size = size if size is not None else int(base.shape[-1])  # type: ignore[union-attr]
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    @property
    def base(self) -> Tensor:
        if callable(self._base):
            self._base = self._base()
        return self._base

    @property
    def size(self) -> int:
        return self._size

    def get(self, size: int | None, channels: int, norm: Norm | None = None) -> Tensor:
        """The batch at ``size`` px (antialiased downscale of the full view) with ``channels`` channels;
        with ``norm = (mean, std)`` normalised as ``(x - mean) / std`` instead of with the dataset's statistics
        (the same crop: ``x = base * std_data + mean_data`` is undone first)."""
        size = size or self.size
        if norm is not None:
            key: tuple[Any, ...] = (size, channels, norm)
            if key not in self._cache:
                self._cache[key] = renormalise(self.get(size, channels), self.stats, norm)
            return self._cache[key]
        key = (size, channels)
        if key not in self._cache:
            x = self.base
            if size != self.size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            if channels != x.shape[1]:
                if x.shape[1] != 1:
                    raise DataError(f"a model expects {channels} input channels but the data has {x.shape[1]}")
                x = x.expand(-1, channels, -1, -1)  # grayscale -> RGB, as Grayscale(num_output_channels=3)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._cache[key] = x
        return self._cache[key]


def renormalise(x: Tensor, stats: tuple[Tensor, Tensor] | None, norm: Norm) -> Tensor:
    """``x`` ``[B, C, S, S]`` normalised with ``stats`` (mean, std ``[1, C', 1, 1]``, C' = C or 1) -> the same
    pixels normalised with ``norm``: ``(x * std_d + mean_d - mean) / std``, one affine map per channel."""
    if stats is None:
        raise ValueError("these views do not know the statistics they were normalised with")
    mean, std = _norm_tensors(norm, x.device, x.dtype)
    if mean.shape[1] != x.shape[1]:
        raise DataError(f"a model normalises {mean.shape[1]} channels but its view has {x.shape[1]}")
    scale = stats[1] / std
    out = x * scale + (stats[0] - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) and x.shape[1] > 1 else out


@functools.lru_cache(maxsize=64)
def _norm_tensors(norm: Norm, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``norm``'s (mean, std) as ``[1, C, 1, 1]`` tensors on ``device``, made once (a copy to the device per step
    would wait for it); read-only: :func:`renormalise` never writes to them."""
    mean = torch.tensor(norm[0], device=device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm[1], device=device, dtype=dtype).view(1, -1, 1, 1)
    return mean, std


class ViewMaker:
    """uint8 batch -> (augmented) normalised float views on ``device``.

    ``prepare`` augments several small batches in one call (up to ``chunk_bytes`` of images):
    RandAugment on a 256 x 28 x 28 batch is launch-bound (~4.8 ms on one core), on 16 batches at
    once ~1 ms per batch. The views are the same, bit for bit, since every choice is keyed per sample.
    """

    def __init__(self, info: DataInfo, augment: str, data_seed: int, device: torch.device,
                 channels_last: bool = False, chunk_bytes: int = 1 << 23, dtype: torch.dtype = torch.float32,
                 views: int = 1, strong: bool = False, mix: BatchMix | None = None) -> None:
        """``views``: training views per sample, 1 (every student reads the same) or one per student; ``strong``:
        make a strongly augmented view of each training sample too (:meth:`strong_views`); ``mix``: mixup or
        CutMix of every training view (None: none)."""
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.device, self.data_seed, self.channels_last, self.views = device, data_seed, channels_last, views
        self.dtype = dtype  # float64 in an fp64 run
        self.mix = mix
        self.chunk_bytes = chunk_bytes
        self.augment: BatchRandAugment | BatchCropFlip | None = (
            BatchRandAugment((info.image_size, info.image_size)) if augment == "randaugment"
            else BatchCropFlip() if augment == "cifar" else None)
        self.strong = (BatchRandAugment((info.image_size, info.image_size), num_ops=2, magnitude=10) if strong
                       else None)
        self.mean = torch.tensor(info.mean, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device, dtype=dtype).view(1, -1, 1, 1)

    def describe(self) -> dict[str, Any]:
        """What decides the views besides the images and the keys (for the teacher-output store's key)."""
        out = {"augment": self.augment.describe() if self.augment is not None else "none",
               "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
               "downscale": "bilinear, antialias"}
        return out | ({"mix": self.mix.describe()} if self.mix is not None else {})

    def prepare(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Training batches with their augmented images made ahead, ``chunk_bytes`` of images at a time."""
        if self.augment is None and self.strong is None:
            yield from batches
            return
        chunk: list[Batch] = []
        for batch in batches:
            chunk.append(batch)
            if sum(b.images.numel() for b in chunk) >= self.chunk_bytes:
                yield from self._augment(chunk)
                chunk = []
        yield from self._augment(chunk)

    def _augment(self, chunk: list[Batch]) -> Iterator[Batch]:
        if not chunk:
            return
        index = torch.cat([b.index for b in chunk])
        assert all(b.epoch == chunk[0].epoch for b in chunk)
        sizes = [len(b.index) for b in chunk]
        per_view = []
        for view in range(self.views):
            if self.augment is not None:
                keys = SampleKeys(self.data_seed, chunk[0].epoch, index, view)
                per_view.append(self.augment(self._chunk_source(chunk, view), keys).split(sizes))
        strong = None
        if self.strong is not None:
            keys = SampleKeys(self.data_seed, chunk[0].epoch, index, STRONG_VIEW)
            strong = self._strong_pixels(self._chunk_source(chunk, 0), keys).split(sizes)
        for i, b in enumerate(chunk):
            yield Batch(b.images, b.labels, b.index, b.epoch, crops=b.crops,
                        augmented=tuple(v[i] for v in per_view) if per_view else None,
                        strong=strong[i] if strong is not None else None)

    def _chunk_source(self, chunk: list[Batch], view: int) -> Tensor:
        """The uint8 images view ``view`` of a chunk of batches is made from, on the device."""
        images = torch.cat([b.source(view) for b in chunk]) if len(chunk) > 1 else chunk[0].source(view)
        if self.device.type == "cuda" and len(chunk) > 1 and images.device.type == "cpu":
            images = images.pin_memory()
        return images.to(self.device, non_blocking=True)

    def _strong_pixels(self, images: Tensor, keys: SampleKeys) -> Tensor:
        """The strong view (uint8): the run's augmentation and then RandAugment(2, 10), both on ``keys``."""
        assert self.strong is not None
        return self.strong(self.augment(images, keys) if self.augment is not None else images, keys)

    def strong_views(self, batch: Batch) -> Views | None:
        """The training batch's strong view (module docstring); ``None`` unless the maker was asked for one."""
        if self.strong is None:
            return None

        def make() -> Tensor:
            x = batch.strong
            if x is None:
                keys = SampleKeys(self.data_seed, batch.epoch, batch.index, STRONG_VIEW)
                x = self._strong_pixels(batch.source(0).to(self.device, non_blocking=True), keys)
            return self._mixed((x.to(self.dtype) / 255 - self.mean) / self.std, batch)

        return Views(make, self.channels_last, size=int(batch.images.shape[-1]), stats=(self.mean, self.std))

    def __call__(self, batch: Batch, train: bool) -> Views:
        """The batch's views (the shared view, view 0, in training; the plain images in evaluation)."""
        return self.view(batch, train, 0)

    def view(self, batch: Batch, train: bool, view: int) -> Views:
        """Training view ``view`` of the batch (view 0 in evaluation, which is not augmented)."""
        def make() -> Tensor:
            v = view if train else 0
            if train and self.augment is not None and batch.augmented is not None:
                x = batch.augmented[v]
            else:
                x = batch.source(v).to(self.device, non_blocking=True)
                if train and self.augment is not None:
                    x = self.augment(x, SampleKeys(self.data_seed, batch.epoch, batch.index, v))
            x = (x.to(self.dtype) / 255 - self.mean) / self.std
            return self._mixed(x, batch) if train else x

        return Views(make, self.channels_last, size=int(batch.images.shape[-1]), stats=(self.mean, self.std))

    def _mixed(self, x: Tensor, batch: Batch) -> Tensor:
        """A normalised training view ``x`` mixed with the batch's draw (``x`` itself without ``mix``)."""
        if self.mix is None:
            return x
        return self.mix.images(x, self.mix.params(batch.epoch, batch.index, x.shape[-2], x.shape[-1]))

    def mixed_labels(self, batch: Batch, labels: Tensor) -> Tensor | None:
        """The labels ``[B, K]`` of the batch's mixed training images (``labels`` ``[B]`` on the device); None
        without ``mix``."""
        if self.mix is None:
            return None
        size = int(batch.images.shape[-1])
        return self.mix.labels(labels, self.mix.params(batch.epoch, batch.index, size, size), self.dtype)

    def for_students(self, batch: Batch, students: int) -> list[Views]:
        """Each student's training views: one shared object for all (one view), or student ``m`` reads view ``m``."""
        if self.views == 1:
            return [self(batch, train=True)] * students
        if students != self.views:
            raise ValueError(f"{students} students but {self.views} views per sample")
        return [self.view(batch, True, m) for m in range(students)]

