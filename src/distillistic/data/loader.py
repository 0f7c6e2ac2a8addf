"""Splits, sampling and loading.

Data flows as uint8 images until it reaches the device: loaders yield :class:`Batch` (images
``[B, C, S, S]`` uint8, labels, sample indices) and :mod:`distillistic.data.views` augments, normalises and
derives the views a step needs on the device. Small datasets live in memory as one tensor and are
gathered per batch; image folders are decoded and cropped in DataLoader workers (the crop box is keyed
by ``(data_seed, epoch, index)`` like every other random choice).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.data.augment import crop_box, sample_hash_int
from distillistic.data.datasets import DATASETS, FileSource, Source, TensorSource, data_root
from distillistic.data.integrity import file_checksum
from distillistic.errors import DataError

__all__ = ["DATASETS", "Batch", "DataBundle", "DataInfo", "EpochSampler", "Loader", "build_data", "resident",
           "split_fingerprint", "stratified_split"]


def stratified_split(labels: Tensor, counts: Sequence[int], seed: int) -> list[Tensor]:
    """Partition ``range(len(labels))`` into parts of exactly ``counts`` samples, stratified by class.

    Samples are shuffled within their class, placed at evenly spread positions ``(rank + u) / n_c`` in
    [0, 1) and sorted by position: every prefix of that order holds each class in proportion, so
    cutting it at the ``counts`` gives stratified parts of exact sizes.
    """
    assert sum(counts) == len(labels), (counts, len(labels))
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    perm = torch.randperm(n, generator=g)
    order = perm[torch.argsort(labels[perm], stable=True)]
    per_class = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = torch.cumsum(per_class, 0) - per_class
    grouped = labels[order]
    rank = torch.arange(n) - starts[grouped]
    position = (rank.double() + torch.rand(n, generator=g, dtype=torch.float64)) / per_class[grouped].double()
    spread = order[torch.argsort(position, stable=True)]
    return [part.sort().values for part in torch.split(spread, list(counts))]


def _shares(n: int, fractions: Sequence[float]) -> list[int]:
    counts = [int(n * f) for f in fractions]
    counts[0] += n - sum(counts)
    return counts


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the code needs to know about the data."""

    dataset: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    sizes: dict[str, int]
    checksum: str
    root: str | None


@dataclass
class DataBundle:
    info: DataInfo
    splits: dict[str, Source]  # "train", "val", "test"


def split_fingerprint(source: Source) -> str:
    """sha256 of what a split holds: its images (in memory) or its files' paths, sizes and times, and labels.

    Sample ``i`` of a split is only the same image in two runs if the fingerprints agree, so the
    teacher-output store keys its entries with them.
    """
    h = hashlib.sha256()
    if isinstance(source, TensorSource):
        images = source.images.contiguous()
        h.update(repr(tuple(images.shape)).encode())
        h.update(images.numpy().data)
    else:
        for path in source.paths:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(source.labels.contiguous().numpy().data)
    return h.hexdigest()


def _resize_in_memory(src: TensorSource, size: int) -> TensorSource:
    if src.images.shape[-1] == size and src.images.shape[-2] == size:
        return src
    x = F.interpolate(src.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return TensorSource(x.round().clamp(0, 255).to(torch.uint8), src.labels)


def build_data(cfg: Config) -> DataBundle:
    """Read the dataset of a resolved config and carve train / val / test (val always from train)."""
    spec = DATASETS.get(cfg.dataset)
    root = data_root(cfg)
    raw = spec.load(cfg, root)
    splits = dict(raw.splits)
    if "all" in splits:
        whole = splits.pop("all")
        parts = stratified_split(whole.labels, _shares(len(whole), cfg.split_fractions), cfg.split_seed)
        splits = {"train": whole.subset(parts[0]), "val": whole.subset(parts[1]), "test": whole.subset(parts[2])}
    else:
        train = splits["train"]
        n_val = max(1, round(len(train) * cfg.val_fraction))
        train_idx, val_idx = stratified_split(train.labels, [len(train) - n_val, n_val], cfg.split_seed)
        splits = {"train": train.subset(train_idx), "val": train.subset(val_idx), "test": splits["test"]}
    if cfg.max_train_samples and cfg.max_train_samples < len(splits["train"]):
        train = splits["train"]
        keep, _ = stratified_split(train.labels, [cfg.max_train_samples, len(train) - cfg.max_train_samples],
                                   cfg.split_seed)
        splits["train"] = train.subset(keep)
    assert cfg.image_size is not None
    for name, src in list(splits.items()):
        if isinstance(src, TensorSource):
            splits[name] = _resize_in_memory(src, cfg.image_size)
    num_classes = len(raw.class_names)
    train = splits["train"]
    if isinstance(train, TensorSource):
        channels = train.images.shape[1]
        pixels = train.images.transpose(0, 1).reshape(channels, -1).float() / 255
        mean = raw.mean or tuple(pixels.mean(1).tolist())
        std = raw.std or tuple(pixels.std(1).clamp(min=1e-3).tolist())
    else:
        channels, mean, std = 3, raw.mean or (0.5,) * 3, raw.std or (0.5,) * 3
    if len(train) == 0 or len(splits["val"]) == 0:
        raise DataError(f"dataset '{cfg.dataset}' in '{root}' is too small to carve train and val splits "
                        f"({len(train)} / {len(splits['val'])} samples); use more data or larger fractions")
    checksum = file_checksum(raw.files) if raw.files else (raw.checksum or "")
    info = DataInfo(cfg.dataset, num_classes, channels, cfg.image_size, tuple(mean), tuple(std),
                    raw.class_names, {k: len(v) for k, v in splits.items()}, checksum,
                    str(root) if cfg.dataset not in ("digits", "synthetic", "mnist-t10k") else None)
    return DataBundle(info, splits)


# --- sampling ------------------------------------------------------------------------------------------


class EpochSampler:
    """The sample indices of every step of every epoch, a pure function of ``(data_seed, epoch)``.

    Training shuffles (or, with ``imbalance``, draws with replacement so that one class makes up the
    given share of each epoch, the thesis's weighted sampler); evaluation keeps order. With several
    processes each rank takes every ``world``-th sample of the epoch's order (padded to equal length).
    ``batch_size`` is per process.
    """

    def __init__(self, labels: Tensor, batch_size: int, data_seed: int, shuffle: bool, rank: int = 0,
                 world: int = 1, imbalance: tuple[int, float] | None = None) -> None:
        self.labels, self.batch_size, self.data_seed = labels, batch_size, data_seed
        self.shuffle, self.rank, self.world, self.imbalance = shuffle, rank, world, imbalance
        n = -(-len(labels) // world)
        # Training drops the ragged last batch (constant batch size, no 1-sample BatchNorm batches).
        self.steps = max(1, n // batch_size) if shuffle else -(-n // batch_size)

    def __len__(self) -> int:
        return self.steps

    def order(self, epoch: int) -> Tensor:
        n = len(self.labels)
        if not self.shuffle:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(sample_hash_int(self.data_seed, epoch, 0, 1 << 20))
            if self.imbalance is None:
                order = torch.randperm(n, generator=g)
            else:
                cls, share = self.imbalance
                counts = torch.bincount(self.labels, minlength=cls + 1).double()
                is_cls = self.labels == cls
                weights = torch.where(is_cls, share / counts[cls], (1 - share) / (n - counts[cls]))
                order = torch.multinomial(weights, n, replacement=True, generator=g)
        if self.world > 1:
            # Training pads so every rank takes the same number of steps; evaluation must not count a
            # sample twice (its sums are all-reduced), so ranks just take unequal shares.
            pad = -len(order) % self.world if self.shuffle else 0
            order = torch.cat([order, order[:pad]])[self.rank :: self.world]
        return order

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Tensor]:
        order = self.order(epoch)
        for step in range(start_step, self.steps):
            yield order[step * self.batch_size : (step + 1) * self.batch_size]


# --- loading -------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: Tensor  # uint8 [B, C, S, S] (view 0's crop when image files are read with several views)
    labels: Tensor  # int64 [B]
    index: Tensor  # int64 [B], sample indices within the split (host)
    epoch: int
    # One uint8 [B, C, S, S] per view on the device, made ahead by ViewMaker.prepare (one view unless each
    # student of a cohort reads its own: --peer-views independent).
    augmented: tuple[Tensor, ...] | None = None
    crops: Tensor | None = None  # uint8 [B, V, C, S, S]: image files read with V > 1 views, each view's own crop
    strong: Tensor | None = None  # uint8 [B, C, S, S] on the device: the strong view, made ahead (ViewMaker.prepare)

    def source(self, view: int) -> Tensor:
        """The uint8 images view ``view`` is made from: its own crop (image files, several views), else ``images``."""
        return self.images if self.crops is None or view == 0 else self.crops[:, view]


# How image files become batches (part of the teacher-output store's key; change it when the code changes).
FILE_TRANSFORM = {"train": "RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) keyed by (data_seed, epoch, index), "
                           "PIL bilinear resize of the box",
                  "eval": "Resize(S * 256 / 224) + CenterCrop(S), PIL bilinear"}


class _FileDataset(torch.utils.data.Dataset[tuple[Tensor, int, int]]):
    """Decodes one image file per ``(epoch, index)`` key: a keyed random crop (train) or centre crop (eval).

    With ``views`` > 1 (train) the file is decoded once and cropped once per view, view ``v`` keyed by
    ``(data_seed, epoch, index, v)``: an item is then ``[V, C, S, S]``, view 0 the crop of a single view.
    """

    def __init__(self, source: FileSource, size: int, train: bool, data_seed: int, views: int = 1) -> None:
        self.source, self.size, self.train, self.data_seed = source, size, train, data_seed
        self.views = views if train else 1

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

        epoch, index = key
        path = self.source.paths[index]
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"image file '{path}' cannot be decoded ({e}); remove or replace it") from None
        s = self.size
        if self.train:
            crops = []
            for view in range(self.views):
                top, left, h, w = crop_box(img.height, img.width, (self.data_seed, epoch, index), view=view)
                crops.append(pil_to_tensor(img.resize((s, s), Image.Resampling.BILINEAR,
                                                      box=(left, top, left + w, top + h))))
            return (crops[0] if self.views == 1 else torch.stack(crops)), int(self.source.labels[index]), index
        else:  # Resize(S * 256 / 224) on the short side, then CenterCrop(S): torchvision's ImageNet eval itself
            img = center_crop(resize(img, round(s * 256 / 224), InterpolationMode.BILINEAR), [s, s])
        return pil_to_tensor(img), int(self.source.labels[index]), index


class _KeyedBatchSampler:
    """Batch sampler over ``(epoch, index)`` keys; the loader sets the epoch and start step before each pass."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx in self.sampler.batches(self.epoch, self.start):
            yield [(self.epoch, i) for i in idx.tolist()]


def _collate(items: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    images, labels, index = zip(*items)
    return torch.stack(images), torch.tensor(labels), torch.tensor(index)


def default_workers() -> int:
    """Data workers for decoding image files: the cores this process may use, minus one for the loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def _ignore_sigint(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which finishes its step, checkpoints and stops.

    A terminal's Ctrl-C reaches the whole process group. Forked workers would otherwise run the main
    process's handler (repeating its message) and die of a second Ctrl-C, failing the main process
    instead of letting it stop cleanly. SIGTERM keeps its default action: the DataLoader itself
    terminates workers that do not exit in time.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resident(source: Source, device: torch.device) -> Source:
    """An in-memory split moved once to a GPU ``device`` (a CIFAR train split is 150 MB as uint8), so that no
    epoch copies images from the host; anything else (CPU, image files) is returned unchanged."""
    if isinstance(source, TensorSource) and device.type == "cuda":
        return TensorSource(source.images.to(device), source.labels.to(device))
    return source


class Loader:
    """Yields the :class:`Batch` es of one split for an epoch, from any step (for resuming)."""

    def __init__(self, source: Source, sampler: EpochSampler, image_size: int, train: bool, data_seed: int,
                 workers: int | None = None, pin_memory: bool = False, views: int = 1) -> None:
        """``views``: crops per training sample of image files, one per view (``--peer-views independent``: one
        per student); in-memory data is augmented per view on the device (:mod:`distillistic.data.views`)."""
        self.source, self.sampler, self.pin = source, sampler, pin_memory
        self.views = views if train and isinstance(source, FileSource) else 1
        self._loader: torch.utils.data.DataLoader[tuple[Tensor, int, int]] | None = None
        if isinstance(source, FileSource):
            self._keys = _KeyedBatchSampler(sampler)
            n = default_workers() if workers is None else workers
            self._loader = torch.utils.data.DataLoader(
                _FileDataset(source, image_size, train, data_seed, self.views), batch_sampler=self._keys,
                num_workers=n, collate_fn=_collate, pin_memory=pin_memory, persistent_workers=n > 0,
                prefetch_factor=4 if n > 0 else None, worker_init_fn=_ignore_sigint,
                # Its own generator: each new iterator draws the workers' base seed, which must not come
                # from (and move) the global RNG, the stream of dropout that a resumed run restores.
                generator=torch.Generator().manual_seed(data_seed))

    def __len__(self) -> int:
        return len(self.sampler)

    def describe(self) -> dict[str, Any]:
        """How this loader turns samples into uint8 images (for the teacher-output store's key)."""
        if isinstance(self.source, TensorSource):
            return {"source": "memory"}
        return {"source": "files", "transform": FILE_TRANSFORM}

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self._loader is not None:
            self._keys.epoch, self._keys.start = epoch, start_step
            for images, labels, index in self._loader:
                if self.views > 1:  # [B, V, C, S, S]: every view's own crop
                    yield Batch(images[:, 0], labels, index, epoch, crops=images)
                else:
                    yield Batch(images, labels, index, epoch)
            return
        assert isinstance(self.source, TensorSource)
        on_host = self.source.images.device.type == "cpu"
        for idx in self.sampler.batches(epoch, start_step):
            where = idx if on_host else idx.to(self.source.images.device, non_blocking=True)
            images, labels = self.source.images[where], self.source.labels[where]
            if self.pin and on_host:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield Batch(images, labels, idx, epoch)
