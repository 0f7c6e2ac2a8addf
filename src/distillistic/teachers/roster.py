"""A run's frozen teachers: one (``--teacher resnet50``) or several (``--teacher resnet50,resnet34``).

Each teacher keeps its own identity: its architecture, its weights (``--teacher-weights``: one entry
per teacher, or one for all), its cached training (:func:`~distillistic.teachers.cache.teacher_recipe`
of its own per-teacher config), its teacher-output store entry, its evaluation row (``teacher`` alone,
``teacher0``, ``teacher1``… when several) and its part of the checkpoint's teacher identity.

Several teachers of the same architecture trained first (``--teacher cnn,cnn --teacher-weights train``)
would otherwise be one and the same model: the k-th occurrence of an architecture uses model seed
``teacher_seed + k``, so the first of each architecture is the teacher a single-teacher run caches.
One teacher is built exactly as before this module existed: the :class:`~distillistic.core.signals.Teacher`
signal, the names and the identity are unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.core.signals import Signal, Teacher, Teachers
from distillistic.data.loader import DataBundle, DataInfo, Loader
from distillistic.data.views import ViewMaker
from distillistic.errors import UserError
from distillistic.models.builders import MODELS
from distillistic.teachers import cache as teachers_mod
from distillistic.teachers.cache import Trainer
from distillistic.training.checkpoint import state_dict_hash
from distillistic.training.engine import Member
from distillistic.training.runtime import Runtime


def teacher_configs(cfg: Config) -> list[Config]:
    """One config per teacher (its ``teacher``, ``teacher_weights`` and ``teacher_seed``); ``[cfg]`` for one."""
    archs = cfg.teacher or ()
    if len(archs) <= 1:
        return [cfg]
    weights = config_mod.teacher_weights_list(cfg)
    seen: dict[str, int] = {}
    out = []
    for arch, source in zip(archs, weights):
        k = seen[arch] = seen.get(arch, -1) + 1
        out.append(cfg.replace(teacher=(arch,), teacher_weights=(source,), teacher_seed=cfg.teacher_seed + k,
                               teacher_mix=()))
    return out


@dataclass
class TeacherSet:
    """The frozen teachers of a run, their signal and their identities."""

    configs: list[Config]  # one per teacher (see teacher_configs)
    signals: list[Teacher]
    members: list[Member]  # evaluated through their signals (read from the store where it has them)
    sources: list[str]
    sha256s: list[str]
    mix: tuple[float, ...] = ()  # weights of several teachers in their mean (teacher_mix; () = equal)
    signal: Signal = field(init=False)

    def __post_init__(self) -> None:
        if len(self.signals) == 1:
            self.signal = self.signals[0]
        else:
            self.signal = Teachers(self.signals, self.mix)

    @property
    def source(self) -> str | list[str]:
        """Where the weights came from: one string for one teacher, a list (one per teacher) for several."""
        return self.sources[0] if len(self.sources) == 1 else list(self.sources)

    @property
    def sha256(self) -> str:
        """One hash for all teachers: the single teacher's weights hash, or a hash of every teacher's."""
        if len(self.sha256s) == 1:
            return self.sha256s[0]
        return hashlib.sha256(",".join(self.sha256s).encode()).hexdigest()

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint records (a resume with other teachers is refused by its ``sha256``)."""
        each = [{"arch": c.teacher_arch, "source": s, "sha256": h}
                for c, s, h in zip(self.configs, self.sources, self.sha256s)]
        if len(each) == 1:
            return each[0]
        return {"arch": ",".join(str(c.teacher_arch) for c in self.configs), "source": ",".join(self.sources),
                "sha256": self.sha256, "teachers": each}

    def open_stores(self, bundle: DataBundle, loaders: dict[str, Loader], views: ViewMaker, rt: Runtime) -> None:
        """Give every teacher its own teacher-output store entry (keyed by its architecture and weights)."""
        from distillistic.teachers.store import open_store

        for c, signal, h in zip(self.configs, self.signals, self.sha256s):
            signal.store = open_store(c, bundle, signal, h, loaders, views, rt)


def build_teachers(cfg: Config, info: DataInfo, rt: Runtime, train: Trainer) -> TeacherSet:
    """Build (train first, load or initialise) every teacher of a resolved config, frozen on ``rt.device``."""
    configs = teacher_configs(cfg)
    for c in configs:  # a missing PATH is refused before another teacher is trained
        (weights,) = c.teacher_weights
        path = Path(weights).expanduser()
        if weights not in ("imagenet", "random", "train") and not path.exists():
            raise UserError(f"teacher weights '{path}' not found: use imagenet, train, random or an existing "
                            "checkpoint, run directory or .safetensors path")  # the message of load_model_weights
    names = config_mod.teacher_names(len(configs))
    signals, members, sources, hashes = [], [], [], []
    for name, c in zip(names, configs):
        model, source = teachers_mod.build_teacher(c, info, train)  # looked up at call time (tests patch it)
        model = model.to(rt.device, rt.dtype)
        hashes.append(state_dict_hash(model.state_dict()))  # its identity: store key, checkpoints
        spec = MODELS.get(c.teacher_arch or "")
        channels, norm = spec.channels(info.channels), spec.norm  # norm: its own (mean, std), e.g. a timm model's
        signal = Teacher(model, c.teacher_resolution, channels, key="teacher" if len(configs) == 1 else name,
                         norm=norm)
        signals.append(signal)
        # The teacher is evaluated through its signal, so its evaluation is read from the store too.
        members.append(Member(name, model, c.teacher_resolution, channels, outputs=signal.eval_logits, norm=norm))
        sources.append(source)
    return TeacherSet(configs, signals, members, sources, hashes, cfg.teacher_mix)
