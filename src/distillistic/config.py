"""Run configuration: one frozen dataclass, YAML files, ``--set key=value`` overrides, validation.

The config is flat on purpose: every CLI flag ``--some-key`` is the config key ``some_key`` (the CLI
is generated from the fields below), so a YAML file, a flag, a ``--set`` override and a sweep's
``grid:`` axis all name a setting the same way. Keys that default to ``None`` are resolved once, by
:func:`distillistic.training.setup.resolve`, from the algorithm's and the dataset's defaults; the
resolved config is what a run saves as ``config.yaml``. This module is a leaf: it never looks a name up.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillistic.errors import ConfigError, UserError, short_repr

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("onecycle", "cosine", "constant", "multistep"),
    "precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
    "augment": ("none", "randaugment", "cifar"),
    "teacher_init": ("random", "imagenet"),
    "data_hash": ("content", "listing"),
    "teacher_calibration": ("none", "temperature"),
    "peer_views": ("shared", "independent"),
}
# The built-in methods' names, for --help (this module never looks a name up, and the CLI shows its help without
# importing torch, which the methods' registry needs); tests/test_registry.py checks it against the registry.
METHOD_NAMES = ("at", "ban", "baseline", "crd", "ctkd", "dist", "dkd", "dml", "dml_e", "fitnet", "kd", "kdcl", "ls",
                "pcl", "rkd", "sp", "tfkd", "tfkd_self")
THESIS_ALPHA = 0.5  # alpha when unset, for the methods of the thesis's composition (1 - alpha) CE + alpha * divergence
# Keys a resolved config used to fill with a value where it now leaves them unset (alpha of a method that has none):
# a run saved with that value and a config leaving the key unset are the same run (resume, a sweep's folders).
FORMERLY_FILLED: dict[str, Any] = {"alpha": THESIS_ALPHA}


def same_setting(key: str, saved: Any, current: Any) -> bool:
    """Whether a saved run's value of ``key`` and the current config's describe the same setting."""
    return saved == current or (current is None and key in FORMERLY_FILLED and saved == FORMERLY_FILLED[key])
INT_LIMIT = 2**63  # every whole number must fit a signed 64-bit integer (torch seeds, tensor sizes)
MAX_PIXELS = 8192  # an image side: beyond, one image alone is hundreds of MiB and most models exhaust memory
# String keys that hold a comma-separated list: a YAML list given for them is joined with ",".
LIST_STRING_KEYS = frozenset({"teacher", "teacher_weights"})


def _f(default: Any, help: str, group: str | None = None) -> Any:
    meta = {"help": help, **({"group": group} if group else {})}  # group: its section of --help if not the comment's
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Every setting of a run. ``None`` means "the algorithm's or dataset's default"."""

    # --- what to run -----------------------------------------------------------------------------
    algo: str = _f("baseline", f"algorithm: {', '.join(METHOD_NAMES)} ('distillistic list algos': each one's "
                               "paper and formula)")
    out: str | None = _f(None, "run directory to create")
    seed: int = _f(42, "model seed: initialisation of every model")
    data_seed: int | None = _f(None, "data seed: order and augmentation of the samples (default: --seed)")
    # --- data --------------------------------------------------------------------------------------
    dataset: str = _f("fashion-mnist", "dataset: fashion-mnist, mnist, digits, imagefolder, synthetic")
    data_root: str | None = _f(None, "dataset folder (default: <cache_dir>/data/<dataset>)")
    split_seed: int = _f(0, "seed of the train/val/test carving (fixed, so every run shares one test split)")
    val_fraction: float = _f(0.1, "share of train carved (stratified, seeded) into the validation split")
    split_fractions: tuple[float, float, float] = _f(
        (0.7, 0.1, 0.2), "train/val/test shares when a dataset ships one split only"
    )
    image_size: int | None = _f(None, "input size in pixels (default: the dataset's)")
    augment: str | None = _f(None, "train augmentation: randaugment, cifar (crop+flip), none (default: the dataset's)")
    max_classes: int | None = _f(None, "imagefolder: keep the first K classes")
    class_names: tuple[str, ...] = _f((), "imagefolder: keep these classes (folder names)")
    max_train_samples: int | None = _f(None, "use a stratified subset of this many training samples")
    synthetic_samples: int = _f(512, "synthetic: number of images")
    synthetic_classes: int = _f(10, "synthetic: number of classes")
    synthetic_channels: int = _f(1, "synthetic: image channels")
    imbalance_class: int | None = _f(None, "draw this class with probability --imbalance-share")
    imbalance_share: float = _f(0.9, "share of the imbalanced class in every epoch's draws")
    num_workers: int | None = _f(None, "data-loading worker processes (default: from the cores available)")
    data_hash: str = _f("content", "manifest checksum of data folders: content (every file's bytes, cached by "
                                   "path, size and mtime) or listing (file names and sizes only)")
    # --- models ------------------------------------------------------------------------------------
    model: str = _f("resnet18", "student architecture")
    students: int | tuple[str, ...] | None = _f(None, "number of students (copies of --model), or a list of their "
                                                "architectures (a mixed cohort: resnet18,mobilenet_v2,cnn); "
                                                "default: 3 for dml/dml_e, else 1")
    student_weights: str = _f("random", "student initialisation: random, imagenet or a checkpoint PATH")
    freeze_backbone: bool = _f(False, "train only the classification head of the students")
    teacher: str | None = _f(None, "teacher architecture (kd; default resnet50), or a list of several "
                                   "(resnet50,resnet34: KD from their mean softened outputs)")
    teacher_weights: str = _f("train", "teacher weights: imagenet, train (train once, cache), random or PATH; "
                                       "several teachers: one entry per teacher (train,PATH) or one for all "
                                       "(one teacher's PATH may hold commas)")
    # --- several teachers (issue 9) -----------------------------------------------------------------
    teacher_mix: tuple[float, ...] = _f((), "several teachers: weight of each in the mean of their softened "
                                            "outputs, q = sum_j w_j softmax(t_j/T) (default: equal)")
    teacher_epochs: int | None = _f(None, "epochs when the teacher is trained first (default: --epochs)")
    teacher_init: str = _f("random", "initialisation when the teacher is trained first: random or imagenet")
    teacher_seed: int = _f(0, "model and data seed when the teacher is trained first (shared by every run)")
    # --- distillation ------------------------------------------------------------------------------
    alpha: float | None = _f(None, "distillation weight: L = (1-alpha) CE + alpha * divergence (default: 0.5; "
                                   "methods whose loss is CE plus their own weighted terms, such as dkd, refuse it)")
    alpha_warmup: float = _f(0.0, "share of epochs over which alpha rises linearly from 0 (thesis: 0.2; only with "
                                  "alpha's methods)")
    temperature: float | None = _f(None, "softmax temperature T (default: 20 for kd and smoothed tfkd, else 1)")
    divergence: str = _f("kl", "divergence to the teaching signal: kl, js, mse")
    peer_views: str = _f("shared", "cohort methods (dml, dml_e, kdcl, pcl): shared (every student reads the same "
                                   "augmented view of a sample) or independent (student m reads its own, keyed by "
                                   "(data seed, epoch, index, m), as KDCL and PCL train)")
    # --- feature distillation: fitnet, at, rkd, sp, crd (stages: stage1..stageN, embedding) ----------
    feature_weight: float | None = _f(None, "feature methods: weight of the feature term (default: the paper's: "
                                            "fitnet 100, at 1000, rkd 1, sp 3000, crd 0.8)")
    feature_kd: float = _f(0.0, "feature methods: weight of an added KD term T²·KL(softmax(t/T) ‖ softmax(z/T))")
    hint_stage: str = _f("stage2", "fitnet: the stage whose map the student regresses onto the teacher's")
    at_stages: tuple[str, ...] = _f((), "at: the stages compared (default: every stage student and teacher share)")
    sp_stage: str = _f("last", "sp: the stage whose batch similarities are matched (last: each model's last one)")
    rkd_distance: float = _f(25.0, "rkd: weight of the distance loss")
    rkd_angle: float = _f(50.0, "rkd: weight of the angle loss")
    crd_negatives: int = _f(16384, "crd: negatives per sample (at most the training samples - 1)")
    crd_temperature: float = _f(0.07, "crd: temperature of the NCE scores")
    crd_momentum: float = _f(0.5, "crd: momentum of the memory bank's update")
    crd_dim: int = _f(128, "crd: dimension of the embedding heads")
    virtual_p: float = _f(0.9, "tfkd: probability of the correct class in the virtual teacher")
    virtual_smooth: bool = _f(False, "tfkd: soften the virtual teacher with softmax(v/T) as the original code")
    # --- logit-based methods (issue 10): ls, dkd, dist, ctkd, kdcl and logit standardisation ---------
    label_smoothing: float = _f(0.1, "ls: smoothing eps of the target (1-eps) onehot + eps/K, in [0, 1)")
    dkd_alpha: float = _f(1.0, "dkd: weight alpha of the target-class term TCKD (Zhao et al. 2022: 1)")
    dkd_beta: float = _f(8.0, "dkd: weight beta of the non-target-class term NCKD (Zhao et al. 2022: 8)")
    dkd_warmup: float = _f(20 / 240, "dkd: share of training over which the DKD term rises linearly from 0 "
                                     "(Zhao et al. 2022: 20 of 240 epochs)")
    dist_beta: float = _f(2.0, "dist: weight beta of the inter-class relation term (Huang et al. 2022: 2)")
    dist_gamma: float = _f(2.0, "dist: weight gamma of the intra-class relation term (Huang et al. 2022: 2)")
    ctkd_ramp: float = _f(10 / 240, "ctkd: share of training over which the reversal strength lambda rises "
                                    "(cosine) from 0 to 1 (Li et al. 2023: 10 of 240 epochs)")
    logit_standardize: bool = _f(False, "z-score teacher/peer and student logits per sample before the temperature "
                                        "(Sun et al. 2024): kd, dkd, dist, ctkd, dml, dml_e, kdcl")
    student_resolution: int | None = _f(None, "cross-quality: students read a downscaled view of this size")
    teacher_resolution: int | None = _f(None, "cross-quality: teacher view size (default: the dataset's)")
    teacher_store: str = _f("auto", "store of frozen-teacher outputs: auto (cache folder), off, or a DIR")
    # --- EMA copies, PCL temporal mean teachers, born-again generations (issue 10) -------------------
    ema: float | None = _f(None, "keep an EMA copy of every student with this decay in (0, 1), evaluated, "
                                 "selected and exported beside it (default: off)")
    pcl_decay: float = _f(0.999, "pcl: EMA decay of each student's temporal mean teacher, in (0, 1)")
    pcl_rampup: float = _f(0.25, "pcl: share of training over which the consistency weight ramps up, in [0, 1]")
    generations: int = _f(3, "ban: born-again generations, each taught by the one before (generation 1: baseline)")
    # --- optimisation ------------------------------------------------------------------------------
    epochs: int = _f(20, "training epochs")
    batch_size: int = _f(128, "global batch size (split across processes)")
    eval_batch_size: int | None = _f(None, "evaluation batch size (default: 2 x --batch-size)")
    lr: float = _f(1e-3, "learning rate (OneCycle's maximum)")
    optimizer: str = _f("adamw", "adamw or sgd")
    weight_decay: float | None = _f(None, "weight decay (default: 0.01 adamw, 1e-4 sgd)")
    momentum: float = _f(0.9, "sgd momentum")
    scheduler: str = _f("onecycle", "learning-rate schedule: onecycle, cosine, constant, multistep")
    # --- ecosystem: step-decay schedule and SGD Nesterov (the published CIFAR/ImageNet KD protocols) --------
    milestones: tuple[int, ...] = _f((), "multistep: epochs after which the learning rate is multiplied by --gamma")
    gamma: float = _f(0.1, "multistep: learning-rate factor at each milestone")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    warmup_fraction: float = _f(0.1, "share of steps spent warming up the learning rate")
    grad_clip: float | None = _f(None, "clip each student's gradient norm to this value")
    # --- calibration of the teaching signal (issue 12) ------------------------------------------------
    teacher_calibration: str = _f("none", "calibrate the frozen teacher before distillation: none or temperature "
                                          "(one T fitted on val by LBFGS on NLL, Guo et al. 2017; t/T before the KD T)")
    virtual_p_from: str | None = _f(None, "tfkd: take --virtual-p from a baseline RUN_DIR's best val top-1, or "
                                          "auto: from the student's baseline, trained once and cached")
    # --- runtime -----------------------------------------------------------------------------------
    device: str = _f("auto", "auto, cpu, cuda, cuda:N, mps")
    precision: str = _f("auto", "auto (bf16 on CUDA, else fp32), fp32, bf16, fp16, fp64 (CPU only)")
    channels_last: bool = _f(False, "use channels-last memory format")
    compile: bool = _f(False, "torch.compile the students")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's)")
    deterministic: bool = _f(False, "use deterministic algorithms only")
    # --- logging and checkpoints -------------------------------------------------------------------
    log_every: int = _f(50, "steps between progress-bar updates (each costs one host sync)")
    checkpoint_every: int = _f(0, "steps between mid-epoch checkpoints (0: end of each epoch only)")
    # --- output (issue 15, the first hour: progress lines; plugins and the teacher check have their groups) ---
    quiet: bool = _f(False, "no progress lines on stderr (warnings and errors still show)")
    line_every: int = _f(0, "a progress line every N training steps (0: only by --line-seconds)")
    line_seconds: float = _f(30.0, "a progress line at most every M seconds inside an epoch (0: off)")
    plugins: tuple[str, ...] = _f((), "Python modules (or .py files) imported before the config is checked; "
                                      "they register models and datasets (docs/custom.md)", group="models")
    allow_weak_teacher: bool = _f(False, "distil from a teacher at chance level on val or recorded for other "
                                         "data", group="distillation")
    progress: bool | None = _f(None, "show progress bars (default: when stderr is a terminal)")
    tensorboard: bool = _f(True, "write TensorBoard events")
    wandb: bool = _f(False, "also log to Weights & Biases (honours WANDB_MODE=offline)")
    cache_dir: str | None = _f(None, "cache for data, trained teachers and teacher stores")
    overwrite: bool = _f(False, "replace a run directory that already holds a run")
    resume: bool = _f(False, "continue the run in --out from its latest checkpoint")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS: dict[str, Any] = typing.get_type_hints(Config)
# Keys that only steer this process and never change what a run computes.
VOLATILE_KEYS = frozenset({"out", "progress", "overwrite", "resume", "num_workers", "log_every", "tensorboard",
                           "checkpoint_every", "wandb", "data_hash"})
VOLATILE_KEYS = VOLATILE_KEYS | {"quiet", "line_every", "line_seconds", "allow_weak_teacher"}  # issue 15
# Keys that steer the machine, not what a run computes: runs that differ only in these are the same run
# (a sweep cell, a cached teacher).
MACHINE_KEYS = VOLATILE_KEYS | {"cache_dir", "data_root", "device", "threads", "teacher_store", "compile"}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def cache_dir(cfg: Config) -> Path:
    """The cache root: ``--cache-dir``, else ``$DISTILLISTIC_CACHE``, else ``~/.cache/distillistic``."""
    root = cfg.cache_dir or os.environ.get("DISTILLISTIC_CACHE") or "~/.cache/distillistic"
    return Path(root).expanduser()


# --- parsing -------------------------------------------------------------------------------------------


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key {short_repr(key)}{hint}; see 'distillistic train --help' for the keys")


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML/``--set`` value to the type of config key ``key`` or raise :class:`ConfigError`."""
    if key not in FIELDS:
        raise _unknown_key(key)
    return _coerce_to(key, value, _HINTS[key])


def _coerce_to(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # "none" is a value of its own where it is a valid choice (--augment none), not "unset".
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")
                                    and value not in CHOICES.get(key, ()))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:
            return _coerce_union(key, value, inner)
        return _coerce_to(key, value, inner[0])
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else _split_list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_to(key, v, args[0]) for v in items)
        if len(items) != len(args):
            raise ConfigError(key, value, f"a list of {len(args)} values")
        return tuple(_coerce_to(key, v, a) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(key, value, "true or false")
    if hint is int:
        return _whole(key, value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(key, value, "a number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(key, value, "a number") from None
        except OverflowError:  # an int beyond float range
            raise ConfigError(key, value, "a finite number") from None
        if not math.isfinite(number):
            raise ConfigError(key, value, "a finite number")
        return number
    if hint is str:
        if key in LIST_STRING_KEYS and isinstance(value, list | tuple) and value:
            return ",".join(_coerce_to(key, v, str) for v in value)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "a string")
    raise TypeError(f"config key {key} has an unsupported type {hint}")


def _coerce_union(key: str, value: Any, hints: list[Any]) -> Any:
    """The first of ``hints`` that accepts ``value`` (``students``: a count, else a list of architectures).

    A number (or a string that reads as one) is only ever a count, so ``students: 2.5`` is refused as
    a count rather than taken as a model named "2.5".
    """
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, str):
        try:
            float(value)
            numeric = True
        except ValueError:
            pass
    if numeric and int in hints:
        return _coerce_to(key, value, int)
    for hint in hints:
        try:
            return _coerce_to(key, value, hint)
        except ConfigError:
            continue
    raise ConfigError(key, value, " or ".join(_describe(h) for h in hints))


def _describe(hint: Any) -> str:
    if hint is int:
        return "a whole number"
    if typing.get_origin(hint) is tuple:
        return "a list of names"
    return getattr(hint, "__name__", str(hint))


def _whole(key: str, value: Any) -> int:
    """An int from an int, an integral float (``1e3``) or a string of either; within +-2**63."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(key, value, "a whole number")
    number: int | float = value if not isinstance(value, str) else math.nan
    if isinstance(value, str):
        try:
            number = int(value.strip())  # exact, also for long digit strings
        except ValueError:
            try:
                number = float(value)
            except (ValueError, OverflowError):
                raise ConfigError(key, value, "a whole number") from None
    if isinstance(number, float):
        if not (math.isfinite(number) and number.is_integer()):
            raise ConfigError(key, value, "a whole number")
        number = int(number)
    if not -INT_LIMIT < number < INT_LIMIT:
        raise ConfigError(key, value, "a whole number between -2**63 and 2**63")
    return number


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
    return [value]


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML scalars (``0.1``, ``true``, ``[a, b]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {short_repr(item)}")
        try:
            value = safe_load_bounded(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a number too long): the raw string
            value = raw
        out[key] = coerce(key, value)
    return out


# Bounds of a config or sweep file: its size, its nodes once every alias is expanded, and its nesting.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 20


class YamlTooLarge(ValueError):
    """A YAML document beyond :data:`MAX_YAML_NODES` expanded nodes or :data:`MAX_YAML_DEPTH` levels."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that measures the composed document before building any Python object: a
    300-byte alias bomb (each level repeating the previous one) is refused in microseconds."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {}, 0)
        return node


def _expanded_size(node: Any, memo: dict[int, tuple[int, int]], depth: int) -> tuple[int, int]:
    """(nodes, height) of ``node`` with every alias expanded, memoised per node (aliases share nodes)."""
    if id(node) in memo:
        size, height = memo[id(node)]
    else:
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        size, height = 1, 0
        for child in children:
            if depth + 1 > MAX_YAML_DEPTH:
                raise YamlTooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels")
            child_size, child_height = _expanded_size(child, memo, depth + 1)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise YamlTooLarge(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
        memo[id(node)] = (size, height)
    if depth + height > MAX_YAML_DEPTH:
        raise YamlTooLarge(f"nested deeper than {MAX_YAML_DEPTH} levels")
    return size, height


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load`` within :data:`MAX_YAML_NODES` and :data:`MAX_YAML_DEPTH` (raises YamlTooLarge)."""
    return yaml.load(text, Loader=_BoundedLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one clear error for a missing, unreadable, malformed or oversized file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist; check the path")
    try:
        if p.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"config file '{p}' is larger than {MAX_YAML_BYTES >> 20} MiB; a config is a few "
                            "lines of key: value")
        data = safe_load_bounded(p.read_text(encoding="utf-8"))
    except YamlTooLarge as e:
        raise UserError(f"config file '{p}' is too large: {e}; write the values out plainly") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        tag = re.search(r"tag '([^']+)'", str(getattr(e, "problem", "")))
        if isinstance(e, yaml.constructor.ConstructorError) and tag:
            raise UserError(f"config file '{p}' uses the YAML tag {tag.group(1)}{where}, which safe loading refuses "
                            "(it could run code); write plain values") from None
        raise UserError(f"config file '{p}' is not valid YAML{where}; fix its syntax") from None
    except OSError as e:
        raise UserError(f"config file '{p}' cannot be read ({e.strerror}); check its permissions") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must hold a mapping of key: value, not {type(data).__name__}")
    return data


def from_mapping(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a config from a flat mapping of keys (dashes or underscores) on top of ``base``."""
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        values[key] = coerce(key, value)
    return dataclasses.replace(base or Config(), **values)


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Config from an optional YAML file, then ``overrides`` (flags and ``--set``), validated."""
    data: dict[str, Any] = dict(read_yaml(path)) if path else {}
    if "grid" in data:
        raise UserError(f"'{path}' has a grid: it is a sweep config; run it with 'distillistic sweep'")
    cfg = from_mapping(data)
    if overrides:
        cfg = from_mapping(overrides, base=cfg)
    validate(cfg)
    return cfg


def save(cfg: Config, path: Path) -> None:
    from distillistic.fileio import atomic_write_text  # an OS failure is one line naming the file

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- validation and resolution ----------------------------------------------------------------------


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
    _validate_cohort_and_teachers(cfg)
    _check(cfg.synthetic_channels in (1, 3), "synthetic_channels", cfg.synthetic_channels, "1 or 3")
    _check(cfg.alpha is None or 0.0 <= cfg.alpha <= 1.0, "alpha", cfg.alpha, "a number in [0, 1]")
    _check(0.0 <= cfg.alpha_warmup < 1.0, "alpha_warmup", cfg.alpha_warmup, "a share of epochs in [0, 1)")
    _check(cfg.temperature is None or 0.01 <= cfg.temperature <= 1000, "temperature", cfg.temperature,
           "a number in [0.01, 1000] (beyond, softmax(z / T) saturates or is uniform to float precision)")
    _check(0.0 < cfg.virtual_p <= 1.0, "virtual_p", cfg.virtual_p, "a probability in (1/K, 1]")
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
    for key in ("student_weights", "teacher_weights"):
        value = getattr(cfg, key)
        _check(bool(value.strip()), key, value, "imagenet, random, train (teacher only) or a checkpoint path")
    _check(cfg.student_weights != "train", "student_weights", "train", "imagenet, random or a checkpoint path")
    # EMA copies, PCL, born-again (issue 10)
    _check(cfg.ema is None or 0.0 < cfg.ema < 1.0, "ema", cfg.ema, "an EMA decay in (0, 1), e.g. 0.999 (or unset)")
    _check(0.0 < cfg.pcl_decay < 1.0, "pcl_decay", cfg.pcl_decay, "an EMA decay in (0, 1), e.g. 0.999")
    _check(0.0 <= cfg.pcl_rampup <= 1.0, "pcl_rampup", cfg.pcl_rampup, "a share of training in [0, 1]")
    _check(cfg.generations > 0, "generations", cfg.generations, "a whole number of generations > 0")
    # logit-based methods (issue 10)
    _check(0.0 <= cfg.label_smoothing < 1.0, "label_smoothing", cfg.label_smoothing, "a number in [0, 1)")
    for key in ("dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma"):
        _check(getattr(cfg, key) >= 0, key, getattr(cfg, key), "a weight >= 0")
    for key in ("dkd_warmup", "ctkd_ramp"):
        _check(0.0 <= getattr(cfg, key) < 1.0, key, getattr(cfg, key), "a share of training in [0, 1)")
    _validate_features(cfg)


def _validate_features(cfg: Config) -> None:
    """Value checks of the feature-distillation keys (stage names are checked against the models)."""
    for key in ("feature_kd", "rkd_distance", "rkd_angle"):
        _check(getattr(cfg, key) >= 0, key, getattr(cfg, key), "a number >= 0")
    _check(cfg.feature_weight is None or cfg.feature_weight >= 0, "feature_weight", cfg.feature_weight,
           "a number >= 0 (or unset: the paper's)")
    for key in ("crd_negatives", "crd_dim"):
        _check(getattr(cfg, key) > 0, key, getattr(cfg, key), "a whole number > 0")
    _check(cfg.crd_temperature > 0, "crd_temperature", cfg.crd_temperature, "a number > 0")
    _check(0.0 <= cfg.crd_momentum < 1.0, "crd_momentum", cfg.crd_momentum, "a number in [0, 1)")


def validate_for_data(cfg: Config, num_classes: int, image_size: int) -> None:
    """Checks that need the dataset: class count and image size."""
    for key in ("student_resolution", "teacher_resolution"):
        value = getattr(cfg, key)
        if value is not None and value > image_size:
            raise ConfigError(key, value, f"at most the input size {image_size} px (views are only downscaled)")
    if cfg.imbalance_class is not None and cfg.imbalance_class >= num_classes:
        raise ConfigError("imbalance_class", cfg.imbalance_class, f"a class index in [0, {num_classes - 1}]")


def split_names(value: str | None) -> list[str]:
    """``"resnet50,resnet34"`` -> ``["resnet50", "resnet34"]`` (a list key given as one string)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def model_names(cfg: Config, key: str) -> list[str]:
    """The architectures named by ``key``: ``model``, ``teacher`` (a list) or ``students`` (when it lists them)."""
    value = getattr(cfg, key)
    if key == "students":
        return list(value) if isinstance(value, tuple) else []
    return split_names(value)


def student_archs(cfg: Config, count: int) -> list[str]:
    """Each of ``count`` students' architecture: the list in ``students``, else ``count`` copies of ``model``."""
    names = model_names(cfg, "students")
    return names if names else [cfg.model] * count


def teacher_names(count: int) -> list[str]:
    """The teachers' names in metrics and summaries: ``teacher`` alone, ``teacher0``, ``teacher1``… when several."""
    return ["teacher"] if count == 1 else [f"teacher{j}" for j in range(count)]


def teacher_weights_list(cfg: Config) -> list[str]:
    """One ``teacher_weights`` entry per teacher (one entry given for several teachers applies to all)."""
    count = max(1, len(split_names(cfg.teacher)))
    entries = _weights_entries(cfg.teacher_weights, count)
    return entries * count if len(entries) == 1 else entries


def _weights_entries(value: str | None, teachers: int) -> list[str]:
    """``teacher_weights`` as entries: one teacher's entry is never split, since a path may hold a comma (a
    sweep's run directory ``runs/x/baseline,seed=0``); several teachers' entries are separated by commas."""
    if teachers <= 1:
        return [value.strip()] if value and value.strip() else []
    return split_names(value)


def _validate_cohort_and_teachers(cfg: Config) -> None:
    """``students`` (a count > 0 or a non-empty list), and the teacher lists' lengths and mix weights."""
    if isinstance(cfg.students, tuple):
        _check(len(cfg.students) > 0, "students", [], "a whole number > 0 or a list of architectures")
    else:
        _check(cfg.students is None or cfg.students > 0, "students", cfg.students,
               "a whole number > 0 (or unset), or a list of architectures")
    mix = cfg.teacher_mix
    _check(all(w >= 0 for w in mix) and (not mix or 0 < sum(mix) < math.inf), "teacher_mix", list(mix),
           "weights >= 0 with a positive, finite sum, one per teacher")
    teachers = split_names(cfg.teacher)
    if not teachers:
        return
    weights = _weights_entries(cfg.teacher_weights, len(teachers))
    _check(len(weights) in (1, len(teachers)), "teacher_weights", cfg.teacher_weights,
           f"one entry for all teachers or one per teacher ({len(teachers)}: {','.join(teachers)})")
    _check(not mix or len(mix) == len(teachers), "teacher_mix", list(mix),
           f"one weight per teacher ({len(teachers)}: {','.join(teachers)}), or unset for equal weights")
