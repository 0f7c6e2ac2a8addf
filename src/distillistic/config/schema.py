"""The run configuration's schema: one frozen dataclass, its common keys written here, its methods' generated.

The config is flat on purpose: every CLI flag ``--some-key`` is the config key ``some_key``, so a YAML file, a
flag, a ``--set`` override and a sweep's ``grid:`` axis all name a setting the same way. The keys every run may
read are written below, each with its help line and its ``--help`` group; the keys of one method (a loss weight,
a number of negatives …) are fields generated from the methods' parameter specs
(:mod:`distillistic.methods.catalogue`). A method registered from the user's own module brings its parameters
with it: they live in :attr:`Config.plugin_params` and read like any key (``cfg.my_param``). Keys that default
to ``None`` are resolved once, from the method's and the dataset's defaults (:mod:`distillistic.training.setup`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillistic.methods import catalogue
from distillistic.methods.spec import Param

_GROUP = ["what to run"]


def section(title: str) -> None:
    """Put the fields that follow in ``--help`` group ``title`` (their ``group`` metadata)."""
    _GROUP[0] = title


def _f(default: Any, help: str) -> Any:
    meta = {"help": help, "group": _GROUP[0]}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CommonConfig:
    """The settings any method may read. ``None`` means "the algorithm's or dataset's default"."""

    section("what to run")
    algo: str = _f("baseline", "algorithm: {methods} ('distillistic list algos': each one's "
                               "paper and formula)")
    out: str | None = _f(None, "run directory to create")
    seed: int = _f(42, "model seed: initialisation of every model")
    data_seed: int | None = _f(None, "data seed: order and augmentation of the samples (default: --seed)")
    section("data")
    dataset: str = _f("fashion-mnist", "dataset: fashion-mnist, mnist, digits, imagefolder, synthetic")
    data_root: str | None = _f(None, "dataset folder (default: <cache_dir>/data/<dataset>)")
    split_seed: int = _f(0, "seed of the train/val/test carving (fixed, so every run shares one test split)")
    val_fraction: float = _f(0.1, "share of train carved (stratified, seeded) into the validation split")
    split_fractions: tuple[float, float, float] = _f(
        (0.7, 0.1, 0.2), "train/val/test shares when a dataset ships one split only"
    )
    image_size: int | None = _f(None, "input size in pixels (default: the dataset's)")
    augment: str | None = _f(None, "train augmentation: randaugment, cifar (crop+flip), none (default: the dataset's)")
    mix: str = _f("none", "mix each training batch after augmentation: none, mixup or cutmix; the teacher and every "
                          "student read the same mixed image, the labels' term the mixed labels")
    mix_alpha: float = _f(1.0, "--mix: α of the Beta(α, α) distribution of the mixing weight (torchvision's 1.0)")
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
    section("models")
    model: str = _f("resnet18", "student architecture")
    students: int | tuple[str, ...] | None = _f(None, "number of students (copies of --model), or a list of their "
                                                "architectures (a mixed cohort: resnet18,mobilenet_v2,cnn); "
                                                "default: the method's ({cohort_sizes}), else 1")
    student_weights: str = _f("random", "student initialisation: random, imagenet or a checkpoint PATH")
    freeze_backbone: bool = _f(False, "train only the classification head of the students")
    teacher: tuple[str, ...] | None = _f(None, "teacher architecture (default: the method's), or a list of "
                                               "several (resnet50,resnet34: KD from their mean softened outputs)")
    teacher_weights: tuple[str, ...] = _f(("train",), "teacher weights: imagenet, train (train once, cache), "
                                                      "random or PATH; several teachers: one entry per teacher "
                                                      "(train,PATH) or one for all (one teacher's PATH may hold "
                                                      "commas)")
    section("teachers")
    teacher_mix: tuple[float, ...] = _f((), "several teachers: weight of each in the mean of their softened "
                                            "outputs, q = sum_j w_j softmax(t_j/T) (default: equal)")
    teacher_epochs: int | None = _f(None, "epochs when the teacher is trained first (default: --epochs)")
    teacher_init: str = _f("random", "initialisation when the teacher is trained first: random or imagenet")
    teacher_seed: int = _f(0, "model and data seed when the teacher is trained first (shared by every run)")
    section("distillation")
    alpha: float | None = _f(None, "distillation weight: L = (1-alpha) CE + alpha * divergence (default: 0.5; "
                                   "methods whose loss is CE plus their own weighted terms refuse it: {sum_methods})")
    alpha_warmup: float = _f(0.0, "share of epochs over which alpha rises linearly from 0 (thesis: 0.2; only with "
                                  "alpha's methods)")
    temperature: float | None = _f(None, "softmax temperature T (default: the method's; 'distillistic list algos')")
    divergence: str = _f("kl", "divergence to the teaching signal: kl, js, mse")
    peer_views: str = _f("shared", "cohort methods ({cohort}): shared (every student reads the same "
                                   "augmented view of a sample) or independent (student m reads its own, keyed by "
                                   "(data seed, epoch, index, m))")
    student_resolution: int | None = _f(None, "cross-quality: students read a downscaled view of this size")
    teacher_resolution: int | None = _f(None, "cross-quality: teacher view size (default: the dataset's)")
    teacher_store: str = _f("auto", "store of frozen-teacher outputs: auto (cache folder), off, or a DIR")
    ema: float | None = _f(None, "keep an EMA copy of every student with this decay in (0, 1), evaluated, "
                                 "selected and exported beside it (default: off)")
    section("optimisation")
    epochs: int = _f(20, "training epochs")
    batch_size: int = _f(128, "global batch size (split across processes)")
    eval_batch_size: int | None = _f(None, "evaluation batch size (default: 2 x --batch-size)")
    lr: float = _f(1e-3, "learning rate (OneCycle's maximum)")
    optimizer: str = _f("adamw", "adamw or sgd")
    weight_decay: float | None = _f(None, "weight decay (default: 0.01 adamw, 1e-4 sgd)")
    momentum: float = _f(0.9, "sgd momentum")
    scheduler: str = _f("onecycle", "learning-rate schedule: onecycle, cosine, constant, multistep")
    section("optimisation")
    milestones: tuple[int, ...] = _f((), "multistep: epochs after which the learning rate is multiplied by --gamma")
    gamma: float = _f(0.1, "multistep: learning-rate factor at each milestone")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    warmup_fraction: float = _f(0.1, "share of steps spent warming up the learning rate")
    grad_clip: float | None = _f(None, "clip each student's gradient norm to this value")
    section("teachers")
    teacher_calibration: str = _f("none", "calibrate the frozen teacher before distillation: none or temperature "
                                          "(one T fitted on val by LBFGS on NLL, Guo et al. 2017; t/T before the KD T)")
    section("runtime")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N, mps")
    precision: str = _f("auto", "auto (bf16 on CUDA, else fp32), fp32, bf16, fp16, fp64 (CPU only)")
    channels_last: bool = _f(False, "use channels-last memory format")
    compile: bool = _f(False, "torch.compile the students")
    threads: int | None = _f(None, "torch intra-op threads (default: torch's)")
    deterministic: bool = _f(False, "use deterministic algorithms only")
    section("output")
    log_every: int = _f(50, "steps between progress-bar updates (each costs one host sync)")
    checkpoint_every: int = _f(0, "steps between mid-epoch checkpoints (0: end of each epoch only)")
    section("output")
    quiet: bool = _f(False, "no progress lines on stderr (warnings and errors still show)")
    line_every: int = _f(0, "a progress line every N training steps (0: only by --line-seconds)")
    line_seconds: float = _f(30.0, "a progress line at most every M seconds inside an epoch (0: off)")
    section("models")
    plugins: tuple[str, ...] = _f((), "Python modules (or .py files) imported before the config is checked; "
                                      "they register models and datasets (docs/custom.md)")
    section("teachers")
    allow_weak_teacher: bool = _f(False, "distil from a teacher at chance level on val or recorded for other "
                                         "data")
    section("output")
    progress: bool | None = _f(None, "show progress bars (default: when stderr is a terminal)")
    tensorboard: bool = _f(True, "write TensorBoard events")
    wandb: bool = _f(False, "also log to Weights & Biases (honours WANDB_MODE=offline)")
    cache_dir: str | None = _f(None, "cache for data, trained teachers and teacher stores")
    overwrite: bool = _f(False, "replace a run directory that already holds a run")
    resume: bool = _f(False, "continue the run in --out from its latest checkpoint")
    # a method registered from the user's own module: its parameters set away from their defaults, as (key, value)
    plugin_params: tuple[tuple[str, Any], ...] = field(default=(), metadata={"hidden": True})

    def __post_init__(self) -> None:
        """The teachers and their weights as tuples, also when given in the comma form (``"resnet50,resnet34"``).

        A ``teacher_weights`` string is one entry for one teacher (a path may hold a comma: a sweep's run directory
        ``runs/x/baseline,seed=0``) and comma-separated entries for several; a list or tuple is already entries.
        """
        teachers = (_names(self.teacher) or None) if isinstance(self.teacher, str) else self.teacher
        weights: Any = self.teacher_weights
        if isinstance(weights, str):
            several = teachers is not None and len(teachers) > 1
            weights = tuple(_names(weights)) if several else (weights.strip(),)
        object.__setattr__(self, "teacher", None if teachers is None else tuple(teachers))
        object.__setattr__(self, "teacher_weights", tuple(weights))

    @property
    def teacher_arch(self) -> str | None:
        """The architecture of the run's one teacher (``None`` when it has none yet, or several)."""
        return self.teacher[0] if self.teacher is not None and len(self.teacher) == 1 else None

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` (a plugin method's parameter too)."""
        own = {f.name for f in dataclasses.fields(self)}
        plugin = {k: changes.pop(k) for k in list(changes) if k not in own}
        if plugin:
            unknown = sorted(set(plugin) - set(catalogue.params()))
            if unknown:
                raise TypeError(f"unknown config key(s): {', '.join(unknown)}")
            merged = dict(self.plugin_params) | plugin
            defaults = catalogue.params()
            changes["plugin_params"] = tuple(sorted((k, v) for k, v in merged.items() if v != defaults[k].default))
        return dataclasses.replace(self, **changes)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value (lists as lists): what a run saves as ``config.yaml``.

        One teacher and its weights are written as plain strings, as a single teacher always was (so a saved run,
        a sweep's cell and a resume compare equal); several teachers and their weights as lists.
        """
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "plugin_params"}
        if self.teacher is None or len(self.teacher) == 1:
            out["teacher"] = self.teacher_arch
            if len(self.teacher_weights) == 1:
                out["teacher_weights"] = self.teacher_weights[0]
        return out | {k: _plain(v) for k, v in self.plugin_values().items()}

    def plugin_values(self) -> dict[str, Any]:
        """The parameters of plugin methods: every registered one, at its value here or its default."""
        builtin = catalogue.builtin_params()
        values = {k: p.default for k, p in catalogue.params().items() if k not in builtin}
        return values | dict(self.plugin_params)

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: plugin parameters
        if not name.startswith("_"):
            values = self.plugin_values()
            if name in values:
                return values[name]
        raise AttributeError(f"'Config' has no key '{name}'")


def _names(value: str) -> tuple[str, ...]:
    """``"resnet50, resnet34"`` -> ``("resnet50", "resnet34")``: the comma form of a list of names."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _method_field(p: Param) -> tuple[str, Any, Any]:
    hint: Any = tuple[str, ...] if p.type is tuple else p.type
    if p.optional:
        hint = hint | None
    default = tuple(p.default) if isinstance(p.default, list | tuple) else p.default
    owners = ", ".join(catalogue.owners(p.name))
    meta = {"help": f"{owners}: {p.help}", "group": "method parameters", "param": p}
    return p.name, hint, field(default=default, metadata=meta)


if TYPE_CHECKING:
    class Config(CommonConfig):
        """Every setting of a run (method parameters read as attributes)."""

        def __getattr__(self, name: str) -> Any: ...
else:
    Config = dataclasses.make_dataclass(
        "Config", [_method_field(p) for p in catalogue.builtin_params().values()], bases=(CommonConfig,),
        frozen=True)
    Config.__module__ = __name__  # so that pickle finds it (make_dataclass takes no module before 3.12)
    Config.__doc__ = "Every setting of a run: the common keys and every built-in method's parameters."

FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config) if f.name != "plugin_params"}
THESIS_ALPHA = 0.5  # alpha when unset, for the methods of the thesis's composition (1 - alpha) CE + alpha * divergence
# Keys that only steer this process and never change what a run computes.
VOLATILE_KEYS = frozenset({"out", "progress", "overwrite", "resume", "num_workers", "log_every", "tensorboard",
                           "checkpoint_every", "wandb", "data_hash", "quiet", "line_every", "line_seconds",
                           "allow_weak_teacher"})
# Keys that steer the machine, not what a run computes: runs that differ only in these are the same run
# (a sweep cell, a cached teacher).
MACHINE_KEYS = VOLATILE_KEYS | {"cache_dir", "data_root", "device", "threads", "teacher_store", "compile"}


def is_key(key: str) -> bool:
    """Whether ``key`` is a config key (a common key, a built-in or a registered plugin method's parameter)."""
    return key in FIELDS or key in catalogue.params()


def all_keys() -> list[str]:
    return [*FIELDS, *(k for k in catalogue.params() if k not in FIELDS)]


def param_of(key: str) -> Param | None:
    """The method parameter behind ``key`` (``None`` for a common key)."""
    return catalogue.params().get(key)


def default_of(key: str) -> Any:
    """The default value of config key ``key``."""
    if key in FIELDS:
        return FIELDS[key].default
    return catalogue.params()[key].default


def cache_dir(cfg: CommonConfig) -> Path:
    """The cache root: ``--cache-dir``, else ``$DISTILLISTIC_CACHE``, else ``~/.cache/distillistic``."""
    root = cfg.cache_dir or os.environ.get("DISTILLISTIC_CACHE") or "~/.cache/distillistic"
    return Path(root).expanduser()

