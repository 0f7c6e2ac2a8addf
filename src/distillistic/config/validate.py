"""Checks of every config value on its own (no registry lookups: names are checked one layer up)."""

from __future__ import annotations

import dataclasses
import math
import re

from distillistic.config.schema import Config
from distillistic.errors import ConfigError
from distillistic.methods import catalogue

MAX_PIXELS = 8192  # an image side: beyond, one image alone is hundreds of MiB and most models exhaust memory

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("onecycle", "cosine", "constant", "multistep"),
    "precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
    "augment": ("none", "randaugment", "cifar"),
    "teacher_init": ("random", "imagenet"),
    "data_hash": ("content", "listing"),
    "teacher_calibration": ("none", "temperature"),
    "peer_views": ("shared", "independent"),
    "mix": ("none", "mixup", "cutmix"),
}


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: Config) -> None:
    """Static checks of every key (no registry lookups: names are checked by
    :func:`distillistic.training.setup.check`); data-dependent ones are in :func:`validate_for_data`."""
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        _check(value is None or value in allowed, key, value, f"one of {', '.join(allowed)}")
    for key in ("epochs", "batch_size", "synthetic_samples", "synthetic_classes", "log_every"):
        _check(getattr(cfg, key) > 0, key, getattr(cfg, key), "a whole number > 0")
    for key in ("eval_batch_size", "image_size", "max_classes", "max_train_samples",
                "student_resolution", "teacher_resolution", "teacher_epochs", "threads"):
        value = getattr(cfg, key)
        _check(value is None or value > 0, key, value, "a whole number > 0 (or unset)")
    for key in ("image_size", "student_resolution", "teacher_resolution"):
        value = getattr(cfg, key)
        _check(value is None or value <= MAX_PIXELS, key, value, f"at most {MAX_PIXELS} px (or unset)")
    _check(cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    _check(cfg.mix_alpha > 0 and math.isfinite(cfg.mix_alpha), "mix_alpha", cfg.mix_alpha, "a number > 0")
    _check(cfg.mix != "none" or cfg.mix_alpha == 1.0, "mix_alpha", cfg.mix_alpha,
           "left at 1.0 without --mix mixup or cutmix (it is the Beta parameter of the mixing weight)")
    _validate_cohort_and_teachers(cfg)
    _check(cfg.synthetic_channels in (1, 3), "synthetic_channels", cfg.synthetic_channels, "1 or 3")
    _check(cfg.alpha is None or 0.0 <= cfg.alpha <= 1.0, "alpha", cfg.alpha, "a number in [0, 1]")
    _check(0.0 <= cfg.alpha_warmup < 1.0, "alpha_warmup", cfg.alpha_warmup, "a share of epochs in [0, 1)")
    _check(cfg.temperature is None or 0.01 <= cfg.temperature <= 1000, "temperature", cfg.temperature,
           "a number in [0.01, 1000] (beyond, softmax(z / T) saturates or is uniform to float precision)")
    _check(0.0 < cfg.val_fraction < 1.0, "val_fraction", cfg.val_fraction, "a share in (0, 1)")
    fr = cfg.split_fractions
    _check(all(0.0 <= f < 1.0 for f in fr) and fr[0] > 0 and fr[1] > 0 and abs(sum(fr) - 1.0) < 1e-6,
           "split_fractions", list(fr), "three shares train, val, test; train and val > 0; summing to 1")
    _check(0.0 < cfg.imbalance_share < 1.0, "imbalance_share", cfg.imbalance_share, "a share in (0, 1)")
    _check(cfg.imbalance_class is None or cfg.imbalance_class >= 0, "imbalance_class", cfg.imbalance_class,
           "a class index >= 0")
    _check(cfg.weight_decay is None or cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    _check(0.0 <= cfg.momentum < 1.0, "momentum", cfg.momentum, "a number in [0, 1)")
    _check(0.0 <= cfg.warmup_fraction < 1.0, "warmup_fraction", cfg.warmup_fraction, "a share in [0, 1)")
    _check(0.0 < cfg.gamma <= 1.0, "gamma", cfg.gamma, "a factor in (0, 1]")
    _check(all(m > 0 for m in cfg.milestones) and list(cfg.milestones) == sorted(set(cfg.milestones)),
           "milestones", list(cfg.milestones), "increasing epochs > 0, e.g. 150,180,210")
    _check((cfg.scheduler == "multistep") == bool(cfg.milestones), "milestones", list(cfg.milestones),
           "epochs such as 150,180,210 with --scheduler multistep, and only with it")
    _check(not cfg.nesterov or (cfg.optimizer == "sgd" and cfg.momentum > 0), "nesterov", cfg.nesterov,
           "false unless --optimizer sgd with --momentum > 0")
    _check(cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip", cfg.grad_clip, "a number > 0 (or unset)")
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "a whole number >= 0")
    _check(cfg.line_every >= 0, "line_every", cfg.line_every, "a whole number >= 0 (0: off)")
    _check(cfg.line_seconds >= 0, "line_seconds", cfg.line_seconds, "a number of seconds >= 0 (0: off)")
    _check(cfg.num_workers is None or cfg.num_workers >= 0, "num_workers", cfg.num_workers, "a number >= 0")
    _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None, "device", cfg.device,
           "auto, cpu, cuda, cuda:N or mps")
    for key in ("seed", "data_seed", "split_seed", "teacher_seed"):
        value = getattr(cfg, key)
        _check(value is None or value >= 0, key, value, "a whole number >= 0")
    _check(bool(cfg.student_weights.strip()), "student_weights", cfg.student_weights,
           "imagenet, random or a checkpoint path")
    _check(cfg.student_weights != "train", "student_weights", "train", "imagenet, random or a checkpoint path")
    _check(cfg.ema is None or 0.0 < cfg.ema < 1.0, "ema", cfg.ema, "an EMA decay in (0, 1), e.g. 0.999 (or unset)")
    _validate_params(cfg)


def _validate_params(cfg: Config) -> None:
    """Every method parameter within its spec's range and choices (a plugin method's too)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} | cfg.plugin_values()
    for key, param in catalogue.params().items():
        problem = param.check(values[key])
        if problem is not None:
            raise ConfigError(key, values[key], problem)


def validate_for_data(cfg: Config, num_classes: int, image_size: int) -> None:
    """Checks that need the dataset: class count and image size."""
    for key in ("student_resolution", "teacher_resolution"):
        value = getattr(cfg, key)
        if value is not None and value > image_size:
            raise ConfigError(key, value, f"at most the input size {image_size} px (views are only downscaled)")
    if cfg.imbalance_class is not None and cfg.imbalance_class >= num_classes:
        raise ConfigError("imbalance_class", cfg.imbalance_class, f"a class index in [0, {num_classes - 1}]")


def split_names(value: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``: a list of names given as one string (``--plugins``, a tuning's ``algo``)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def model_names(cfg: Config, key: str) -> list[str]:
    """The architectures named by ``key``: ``model``, ``teacher`` (a list) or ``students`` (when it lists them)."""
    value = getattr(cfg, key)
    if key == "model":
        return [value]
    return list(value) if isinstance(value, tuple) else []


def student_archs(cfg: Config, count: int) -> list[str]:
    """Each of ``count`` students' architecture: the list in ``students``, else ``count`` copies of ``model``."""
    names = model_names(cfg, "students")
    return names if names else [cfg.model] * count


def teacher_names(count: int) -> list[str]:
    """The teachers' names in metrics and summaries: ``teacher`` alone, ``teacher0``, ``teacher1``… when several."""
    return ["teacher"] if count == 1 else [f"teacher{j}" for j in range(count)]


def teacher_weights_list(cfg: Config) -> list[str]:
    """One ``teacher_weights`` entry per teacher (one entry given for several teachers applies to all)."""
    count = max(1, len(cfg.teacher or ()))
    entries = list(cfg.teacher_weights)
    return entries * count if len(entries) == 1 else entries


def _validate_cohort_and_teachers(cfg: Config) -> None:
    """``students`` (a count > 0 or a non-empty list), and the teacher lists' lengths and mix weights."""
    if isinstance(cfg.students, tuple):
        _check(len(cfg.students) > 0, "students", [], "a whole number > 0 or a list of architectures")
        model_default = next(f.default for f in dataclasses.fields(cfg) if f.name == "model")
        _check(cfg.model == model_default or cfg.model in cfg.students, "model", cfg.model,
               f"left out when --students lists the architectures ({', '.join(cfg.students)}): each student is "
               "built from its own entry, so --model would be ignored; remove --model, or list it in --students")
    else:
        _check(cfg.students is None or cfg.students > 0, "students", cfg.students,
               "a whole number > 0 (or unset), or a list of architectures")
    mix = cfg.teacher_mix
    _check(all(w >= 0 for w in mix) and (not mix or 0 < sum(mix) < math.inf), "teacher_mix", list(mix),
           "weights >= 0 with a positive, finite sum, one per teacher")
    _check(bool(cfg.teacher_weights) and all(w.strip() for w in cfg.teacher_weights), "teacher_weights",
           list(cfg.teacher_weights), "imagenet, random, train or a checkpoint path (one entry per teacher, or one "
                                      "for all)")
    teachers = cfg.teacher
    _check(teachers is None or len(teachers) > 0, "teacher", [], "an architecture, a list of several, or unset")
    if not teachers:
        _check(len(cfg.teacher_weights) == 1, "teacher_weights", list(cfg.teacher_weights),
               "one entry, for the one teacher (a list gives one entry per teacher of --teacher)")
        return
    weights = cfg.teacher_weights
    _check(len(weights) in (1, len(teachers)), "teacher_weights", list(weights),
           f"one entry for all teachers or one per teacher ({len(teachers)}: {','.join(teachers)})")
    _check(not mix or len(mix) == len(teachers), "teacher_mix", list(mix),
           f"one weight per teacher ({len(teachers)}: {','.join(teachers)}), or unset for equal weights")
