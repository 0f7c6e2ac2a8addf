"""Your own model and data: register any ``nn.Module`` builder and any map-style dataset or folder.

From Python::

    from distillistic.training.plugins import register_dataset, register_model

    register_model("my_net", lambda num_classes, in_channels, image_size: MyNet(num_classes))
    register_dataset("my_data", lambda root: {"train": my_train_set, "test": my_test_set})

From a config file, either name the module that registers them (imported before the config is
checked)::

    plugins: [mypkg.models]        # or a file: plugins: [./my_models.py]
    model: my_net

or name a function directly, ``module:function`` (the module is found on ``sys.path`` or in the
current folder)::

    model: my_models:build_net      # build_net(num_classes, in_channels, image_size) -> nn.Module
    dataset: my_data:load           # load(root) -> dataset | {"train": ..., "test": ...} | folder path

A dataset function receives ``--data-root`` as a ``Path`` (or ``None``) and returns a map-style
dataset of ``(image, label)`` pairs (a tensor ``[C, H, W]`` or ``[H, W]``, float in [0, 1] or uint8,
a PIL image or a NumPy array; carved 0.7/0.1/0.2 by ``--split-fractions``), a mapping with ``train``
and ``test`` datasets (val is carved from train), or the path of an image folder (read as
``--dataset imagefolder``). Map-style datasets are read once into memory as uint8 images.
See ``docs/custom.md``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.data.datasets import DATASETS, DatasetSpec, RawDataset, Source, TensorSource
from distillistic.errors import UserError
from distillistic.imports import import_module_or_file
from distillistic.models.builders import MODELS, ModelSpec

ModelBuilder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model
DataFunction = Callable[[Path | None], Any]  # (data_root) -> dataset | {"train", "test"} | folder


def register_model(name: str, build: ModelBuilder, channels: int | None = None) -> None:
    """Register ``build(num_classes, in_channels, image_size) -> nn.Module`` as model ``name``.

    ``channels``: the input channels the model takes (3 expands grayscale data); None: the dataset's.
    """
    def builder(num_classes: int, in_channels: int, image_size: int, imagenet: bool) -> nn.Module:
        model = build(num_classes, in_channels, image_size)
        if not isinstance(model, nn.Module):
            raise UserError(f"model '{name}': its builder returned {type(model).__name__}, not a torch nn.Module")
        return model

    MODELS.add(name, ModelSpec(name, builder, channels, False))


@dataclass(frozen=True)
class _UserDatasetSpec(DatasetSpec):
    """A registered dataset: its native size is read from its first image (the data is read once)."""

    function: DataFunction | None = None

    def default_image_size(self, cfg: Config) -> int:
        raw = self.load(cfg, Path(cfg.data_root).expanduser() if cfg.data_root else Path())
        for src in raw.splits.values():
            if isinstance(src, TensorSource):
                return int(src.images.shape[-1])
        return self.fallback_size


def register_dataset(name: str, load: DataFunction, augment: str = "none", image_size: int = 224) -> None:
    """Register ``load(root) -> dataset | {"train": dataset, "test": dataset} | folder`` as dataset ``name``.

    ``augment``: its default train augmentation (none or randaugment); ``image_size``: the input size of
    a folder's images (a map-style dataset's size is that of its images).
    """
    cache: dict[str, RawDataset] = {}

    def reader(cfg: Config, root: Path) -> RawDataset:
        key = f"{cfg.data_root}|{cfg.class_names}|{cfg.max_classes}"
        if key not in cache:
            result = load(Path(cfg.data_root).expanduser() if cfg.data_root else None)
            if isinstance(result, str | Path):
                cache[key] = DATASETS.get("imagefolder").load(cfg, Path(result).expanduser())
            else:
                cache[key] = raw_dataset(name, result)
        return cache[key]

    DATASETS.add(name, _UserDatasetSpec(name, reader, augment, None, image_size, function=load))


def _image(item: Any, where: str) -> Tensor:
    """One image as uint8 ``[C, H, W]``."""
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(item)
    x = torch.as_tensor(np.asarray(item)) if not isinstance(item, Tensor) else item.detach().cpu()
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise UserError(f"{where}: an image must be [C, H, W] or [H, W], got shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point():
        return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.clamp(0, 255).to(torch.uint8)


def _tensor_source(dataset: Any, where: str) -> TensorSource:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise UserError(f"{where}: expected a map-style dataset (with __len__ and __getitem__), a mapping of "
                        f"them or a folder path, got {type(dataset).__name__}")
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, tuple | list) and len(item) >= 2):
            raise UserError(f"{where}: item {i} is not an (image, label) pair")
        images.append(_image(item[0], f"{where}: item {i}"))
        labels.append(int(item[1]))
    if not images:
        raise UserError(f"{where}: the dataset is empty")
    try:
        stacked = torch.stack(images)
    except RuntimeError:
        raise UserError(f"{where}: images differ in shape; resize them to one size in the dataset") from None
    return TensorSource(stacked.contiguous(), torch.tensor(labels, dtype=torch.int64))


def raw_dataset(name: str, result: Any) -> RawDataset:
    """What a user's dataset function returned, as the reader's :class:`RawDataset` (uint8 images in memory)."""
    where = f"dataset '{name}'"
    if isinstance(result, Mapping):
        unknown = set(result) - {"train", "test", "all"}
        if unknown or not ({"train", "test"} <= set(result) or set(result) == {"all"}):
            raise UserError(f"{where}: the mapping must hold 'train' and 'test' (or 'all'), got {sorted(result)}")
        splits: dict[str, Source] = {k: _tensor_source(v, f"{where} ({k})") for k, v in result.items()}
        first = next(iter(result.values()))
    else:
        splits, first = {"all": _tensor_source(result, where)}, result
    k = int(max(int(s.labels.max()) for s in splits.values())) + 1
    classes = getattr(first, "classes", None)
    names = tuple(str(c) for c in classes) if isinstance(classes, list | tuple) and len(classes) >= k else tuple(
        str(i) for i in range(k))
    digest = hashlib.sha256()
    for split in sorted(splits):
        src = splits[split]
        assert isinstance(src, TensorSource)
        digest.update(split.encode() + src.images.numpy().tobytes() + src.labels.numpy().tobytes())
    return RawDataset(splits, names, checksum=digest.hexdigest())


# --- loading plugins from a config -----------------------------------------------------------------------


def _function(ref: str, key: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    fn = getattr(import_module_or_file(module, f"config key '{key}'"), name, None)
    if not callable(fn):
        raise UserError(f"config key '{key}': '{module}' has no function '{name}'; name one as module:function")
    return fn


def load_plugins(cfg: Config) -> None:
    """Import ``cfg.plugins`` and register every ``module:function`` model and dataset name the config uses."""
    for module in cfg.plugins:
        import_module_or_file(module, "config key 'plugins'")
    names = [("model", cfg.model)] + [("teacher", n) for n in cfg.teacher or ()]
    for key, name in names:
        if ":" in name and name not in MODELS:
            register_model(name, _function(name, key))
    if ":" in cfg.dataset and cfg.dataset not in DATASETS:
        fn = _function(cfg.dataset, "dataset")
        register_dataset(cfg.dataset, fn if len(inspect.signature(fn).parameters) else (lambda root: fn()))
