"""A config's checks against the registries, and its resolution into what a run saves.

:mod:`distillistic.config` is a leaf: it checks every value on its own but never looks a name up. The
checks that need the registries (methods, datasets, models, divergences) and the defaults that come
from them live here, one layer above both.
"""

from __future__ import annotations

from collections.abc import Collection

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.core.divergences import DIVERGENCES
from distillistic.data.datasets import DATASETS
from distillistic.errors import ConfigError, UserError
from distillistic.methods.registry import METHODS
from distillistic.models.builders import MODELS
from distillistic.training.plugins import load_plugins


def check(cfg: Config) -> None:
    """Every static check: the values (:func:`config.validate`), the names, the method's own parameters."""
    config_mod.validate(cfg)
    load_plugins(cfg)  # your own models and datasets (docs/custom.md)
    for key, registry in (("algo", METHODS), ("dataset", DATASETS), ("divergence", DIVERGENCES)):
        value = getattr(cfg, key)
        if value not in registry:
            raise UserError(f"config key '{key}': {registry.unknown_message(value)}")
    for key in ("model", "teacher", "students"):
        for name in config_mod.model_names(cfg, key):
            if name not in MODELS:
                raise UserError(f"config key '{key}': {MODELS.unknown_message(name)}")
    _check_data_root(cfg)
    METHODS.get(cfg.algo).check(cfg)


def check_given(cfg: Config, given: Collection[str]) -> None:
    """The checks of the keys the user set explicitly (flags, ``--set``, a run's YAML, a sweep cell's own keys,
    ``train(**overrides)``), which a default cannot be told from: the method's (:meth:`Method.check_given`)."""
    if cfg.algo in METHODS:
        METHODS.get(cfg.algo).check_given(cfg, {str(k).replace("-", "_") for k in given})


def _check_data_root(cfg: Config) -> None:
    """Refuse ``--data-root`` for a dataset that reads no folder (it would be silently unused)."""
    spec = DATASETS.get(cfg.dataset)
    if cfg.data_root is not None and spec.no_root is not None:
        folders = ", ".join(n for n in DATASETS.names() if DATASETS.get(n).no_root is None)
        raise UserError(f"config key 'data_root' is not read by dataset {cfg.dataset} ({spec.no_root}); remove "
                        f"it, or choose a dataset read from a folder: {folders}")


def resolve(cfg: Config) -> Config:
    """Fill every ``None`` default from the algorithm and dataset; the result is what a run saves."""
    check(cfg)
    method = METHODS.get(cfg.algo)
    spec = DATASETS.get(cfg.dataset)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else (
        0.01 if cfg.optimizer == "adamw" else 1e-4)
    resolved = cfg.replace(
        data_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
        weight_decay=weight_decay,
        augment=cfg.augment or spec.default_augment,
        image_size=cfg.image_size or spec.default_image_size(cfg),
        eval_batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
    )
    resolved = method.resolve(resolved)
    check(resolved)
    return resolved


def check_for_data(cfg: Config, num_classes: int, image_size: int, files: bool = False) -> None:
    """The checks that need the dataset: the config's own (sizes, classes), then the method's. ``files``: the
    training images are files, cropped per sample by the loader (else they are in memory)."""
    config_mod.validate_for_data(cfg, num_classes, image_size)
    if cfg.peer_views == "independent" and cfg.augment == "none" and not files:
        raise ConfigError("peer_views", cfg.peer_views, "shared with --augment none on in-memory data (every "
                                                        "student would read the same view); or choose --augment "
                                                        "randaugment or cifar")
    METHODS.get(cfg.algo).check_for_data(cfg, num_classes)
