"""Frozen teachers: ImageNet weights, a checkpoint, random initialisation, or trained first and cached.

``teacher_weights=train`` trains the teacher with the baseline recipe (same data, optimiser and
schedule, ``teacher_epochs`` epochs, model seed ``teacher_seed``) into
``<cache_dir>/teachers/<arch>-<hash>``, where the hash covers the teacher's recipe and the data's
checksum. Every later run naming the same teacher config finds it there and reuses it; a lock keeps
concurrent sweep shards from training it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distillistic import config as config_mod
from distillistic.config import Config, cache_dir
from distillistic.data.loader import DataInfo
from distillistic.errors import CheckpointError, TeacherStopped, UserError, shown
from distillistic.locks import wait_lock
from distillistic.methods import catalogue
from distillistic.methods.spec import OPTIONAL_KEYS
from distillistic.models.builders import build_model
from distillistic.runs.rundir import read_summary
from distillistic.training.checkpoint import load_model_weights
from distillistic.training.lines import prefixed
from distillistic.training.runtime import derived_seed

log = logging.getLogger("distillistic")

_DEFAULTS = Config()


def teacher_recipe(cfg: Config) -> Config:
    """The baseline config that trains this run's teacher.

    Every key a baseline does not read (a teacher, alpha, T, a divergence, every method's parameters) is reset
    to its default: they are settings of the distillation, not of the teacher, so they never reach its cache key
    (a student with another alpha reuses the same teacher).
    """
    assert cfg.teacher_arch is not None, "one teacher's config (teachers.roster.teacher_configs)"
    teacher, epochs = cfg.teacher_arch, cfg.teacher_epochs or cfg.epochs
    unread = {k: config_mod.default_of(k) for k in (*OPTIONAL_KEYS, *catalogue.params())}
    return cfg.replace(**unread).replace(
        algo="baseline", model=teacher, students=1, student_weights=cfg.teacher_init, freeze_backbone=False,
        epochs=epochs, seed=cfg.teacher_seed, data_seed=cfg.teacher_seed, student_resolution=cfg.teacher_resolution,
        out=None, resume=False, overwrite=True, imbalance_class=None, ema=None,  # a teacher keeps no EMA copy
        mix="none", mix_alpha=1.0,  # --mix is how the students are taught, not how the teacher was trained
        imbalance_share=config_mod.default_of("imbalance_share"))


# The keys that define a trained teacher, and nothing else: a distillation setting (alpha, a method's
# parameter, the student's model) can never reach the key, so no sweep retrains the teacher per value.
TEACHER_KEYS = (
    "model", "student_weights", "seed", "data_seed", "epochs",
    "dataset", "split_seed", "val_fraction", "split_fractions", "image_size", "augment", "max_classes",
    "class_names", "max_train_samples", "synthetic_samples", "synthetic_classes", "synthetic_channels",
    "student_resolution", "batch_size", "lr", "optimizer", "weight_decay", "momentum", "scheduler",
    "warmup_fraction", "grad_clip", "precision", "channels_last", "deterministic", "milestones", "gamma", "nesterov",
)


def recipe_key(recipe: Config, info: DataInfo) -> str:
    """A short hash of the teacher's defining keys (:data:`TEACHER_KEYS`) and the data's checksum."""
    settings = recipe.to_dict()
    items: dict[str, Any] = {k: settings[k] for k in TEACHER_KEYS}
    items["data_checksum"] = info.checksum
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


Trainer = Callable[[Config], object]


def trained_teacher_dir(cfg: Config, info: DataInfo, train: Trainer) -> Path:
    """Train the teacher once with ``train`` (the run's own trainer, as a baseline run), or find it trained;
    return its run directory."""

    recipe = teacher_recipe(cfg)
    folder = cache_dir(cfg) / "teachers" / f"{recipe.model}-{recipe_key(recipe, info)}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():  # under torchrun every rank takes part in training the teacher
        done = [_completed(folder)]
        dist.broadcast_object_list(done, src=0)
        if not done[0]:
            _train_teacher(recipe, folder, train)
        dist.barrier()
        return folder
    lock_path = folder.parent / f"{folder.name}.lock"
    with lock_path.open("a") as lock:
        wait_lock(lock, lock_path, f"the teacher being trained into '{folder}' by another process")
        if _completed(folder):
            log.info("teacher: reusing %s", shown(folder))
        else:
            _train_teacher(recipe, folder, train)
    return folder


def _completed(folder: Path) -> bool:
    return read_summary(folder).get("status") == "completed"


def _train_teacher(recipe: Config, folder: Path, train: Trainer, restart: bool = False) -> None:
    """Train the teacher into ``folder``, resuming an earlier interrupted (or killed) training from its
    ``last.pt``; a teacher that stops, fails or diverges is never used (:class:`TeacherStopped`/UserError)."""
    resume = not restart and (folder / "checkpoints" / "last.pt").is_file()
    log.info("teacher: %s %s (%d epochs) in %s", "resuming" if resume else "training", recipe.model,
             recipe.epochs, shown(folder))
    try:
        with prefixed("teacher"):  # its own progress lines, told apart from the student's
            result = train(recipe.replace(out=str(folder), resume=resume, overwrite=not resume))
    except CheckpointError as e:
        if not resume:
            raise
        log.warning("teacher: the cached teacher's checkpoint cannot be resumed (%s); training it again", e)
        return _train_teacher(recipe, folder, train, restart=True)
    except UserError as e:
        raise UserError(f"the teacher trained first into '{folder}' did not complete: {e}") from None
    status = getattr(result, "summary", {}).get("status")
    if status != "completed":
        raise TeacherStopped(str(getattr(result, "summary", {}).get("reason") or status), folder)


def build_teacher(cfg: Config, info: DataInfo, train: Trainer) -> tuple[nn.Module, str]:
    """The frozen teacher of a resolved one-teacher config and a description of where its weights came from."""
    arch, (source,) = cfg.teacher_arch, cfg.teacher_weights
    assert arch is not None, "one teacher's config (teachers.roster.teacher_configs)"
    torch.manual_seed(derived_seed(cfg.teacher_seed, "teacher"))  # the same teacher for every student seed
    if source == "imagenet" and info.num_classes != 1000:
        raise UserError(f"ImageNet weights give {arch} a 1000-class head but '{cfg.dataset}' has "
                        f"{info.num_classes} classes, and a teacher needs a trained head: use --teacher-weights train "
                        "--teacher-init imagenet to fine-tune it on this dataset first")
    if source in ("random", "imagenet"):
        model = build_model(arch, info.num_classes, info.channels, cfg.teacher_resolution or info.image_size,
                            imagenet=source == "imagenet")
        return model, source
    path = trained_teacher_dir(cfg, info, train) if source == "train" else Path(source).expanduser()
    model = build_model(arch, info.num_classes, info.channels, cfg.teacher_resolution or info.image_size)
    try:
        load_model_weights(model, path, arch, "teacher", "--teacher", "imagenet, train, random")
    except CheckpointError as e:
        if source != "train":
            raise
        # A cache: a damaged file is recomputed (with a warning), never used.
        log.warning("teacher: the cached teacher is damaged (%s); training it again", e)
        _train_teacher(teacher_recipe(cfg), path, train, restart=True)
        load_model_weights(model, path, arch, "teacher", "--teacher", "imagenet, train, random")
    return model, str(path)
