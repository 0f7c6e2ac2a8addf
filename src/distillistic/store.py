"""Teacher-output store (see issue 5); not enabled yet: every run computes its teacher live."""

from __future__ import annotations

from torch import nn

from .config import Config
from .data import DataInfo
from .signals import TeacherOutputs


def open_store(cfg: Config, info: DataInfo, source: str | None, teacher: nn.Module) -> TeacherOutputs | None:
    return None
