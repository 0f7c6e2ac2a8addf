"""The run's side of feature distillation: probing the models' stages and tapping them for the loop.

:class:`ModelProbe` answers a feature method's questions at build time (which stages a model offers, their
shapes from one dry forward, the training split's size). :func:`attach_taps` then registers forward hooks on
the *plain* students and teacher (before any DDP or ``torch.compile`` wrapping) for exactly the stages the
objective's terms name; a run whose terms name none registers nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from distillistic.config import Config
from distillistic.core.features import Role
from distillistic.core.objective import Objective
from distillistic.core.signals import Teacher
from distillistic.data.loader import DataInfo
from distillistic.models.builders import MODELS
from distillistic.models.stages import attach_taps, class_head, feature_shapes, stage_modules, stage_names
from distillistic.models.taps import Taps

TEACHER_LIVE = "live: the feature method reads the teacher's stages, which the teacher-output store does not hold"


class ModelProbe:
    """The :class:`~distillistic.core.features.FeatureProbe` of a run: its plain students and teacher."""

    def __init__(self, cfg: Config, info: DataInfo, students: Sequence[nn.Module], teacher: nn.Module | None,
                 n_data: int) -> None:
        self.cfg, self.info, self.n_data = cfg, info, n_data
        self._students, self._teacher = list(students), teacher

    def _model(self, role: Role, i: int) -> tuple[str, nn.Module, int, int]:
        """(arch, model, channels, input size) of student ``i`` or of the teacher."""
        cfg, info = self.cfg, self.info
        if role == "teacher":
            assert self._teacher is not None, "this run has no teacher"
            assert cfg.teacher_arch is not None, "feature methods read one teacher"
            arch, model, size = cfg.teacher_arch, self._teacher, cfg.teacher_resolution or info.image_size
        else:
            arch, model, size = cfg.model, self._students[i], cfg.student_resolution or info.image_size
        return arch, model, MODELS.get(arch).channels(info.channels), size

    def stages(self, role: Role, i: int = 0) -> tuple[str, ...]:
        arch, model, _, _ = self._model(role, i)
        return stage_names(arch, model)

    def shapes(self, role: Role, stages: Sequence[str], i: int = 0) -> dict[str, tuple[int, ...]]:
        arch, model, channels, size = self._model(role, i)
        return feature_shapes(arch, model, stages, channels, size, role)

    def stage_modules(self, role: Role, i: int = 0) -> dict[str, nn.Module]:
        arch, model, _, _ = self._model(role, i)
        return stage_modules(arch, model)

    def classifier(self, role: Role, stage: str, i: int = 0) -> nn.Linear:
        arch, model, channels, size = self._model(role, i)
        return class_head(arch, model, stage, channels, size, role)


def _wanted(objective: Objective, attr: str) -> list[str]:
    """The stages the objective's terms read, in first-use order."""
    names: dict[str, None] = {}
    for term in objective.extra:
        names |= dict.fromkeys(getattr(term, attr))
    return list(names)


def attach_taps_for(cfg: Config, objective: Objective, students: Sequence[nn.Module],
                    teacher: Teacher | None) -> list[Taps | None]:
    """Hooks for the stages the terms read: one :class:`Taps` per student (None: none read) and on the teacher.

    The teacher's taps go to its signal, whose outputs on a step's batch (the teaching stage's) then hold the maps
    of its forward; a teacher with taps must run live, so the caller leaves its output store off.
    """
    student_stages, teacher_stages = _wanted(objective, "student_stages"), _wanted(objective, "teacher_stages")
    if teacher_stages:
        assert teacher is not None, "a feature term without a teacher"
        assert cfg.teacher_arch is not None, "feature methods read one teacher"
        teacher.taps = attach_taps(cfg.teacher_arch, teacher.model, teacher_stages, "teacher")
    if not student_stages:
        return [None] * len(students)
    return [attach_taps(cfg.model, m, student_stages, "student") for m in students]
