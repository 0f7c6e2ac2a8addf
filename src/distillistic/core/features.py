"""What every feature-distillation term shares: the stages it reads, the teacher's maps pooled to the student's grid.

A feature term names the stages it reads (``student_stages``, ``teacher_stages``, see
:mod:`distillistic.models.stages`); the run registers forward hooks for them on the plain models, and each
step the student's captured maps reach the term *with* gradient in ``inp.features[i]`` and the teacher's,
computed under ``no_grad`` by its :class:`~distillistic.core.signals.Teacher` signal, through
:meth:`FeatureTeacher.features`. Adapters (the FitNets regressor, CRD's embeddings) and state (CRD's memory
bank and its generator) belong to the term: they are shaped at build time from a :class:`FeatureProbe` (one dry
forward), train with their student (:meth:`Term.student_parameters`) and are saved with the objective's
``state_dict()``; ``export`` never sees them.

Cross-quality runs (``--student-resolution``): the teacher's full-resolution maps are average-pooled to the
student's grid (:func:`match_grid`) before any loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs

Role = Literal["student", "teacher"]


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision, else unchanged (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pool_to(ft: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of a map ``[B, C, H, W]`` to ``[B, C, h, w]`` with ``h <= H``, ``w <= W``.

    Cross-resolution KD: the teacher sees the full-resolution image and the student a downscaled view, so the
    teacher's map is averaged down to the student's grid. A map already of that size is returned as it is
    (adaptive pooling to the same size is the identity, but skipping it keeps the tensor itself). Pooling
    cannot enlarge a map: a larger ``size`` is an error rather than a silent duplication of pixels.
    """
    if ft.dim() != 4:
        raise ValueError(f"pool_to expects a [B, C, H, W] map, got shape {tuple(ft.shape)}")
    h, w = int(size[0]), int(size[1])
    if (h, w) == tuple(ft.shape[-2:]):
        return ft
    if h > ft.shape[-2] or w > ft.shape[-1] or h < 1 or w < 1:
        raise ValueError(f"cannot pool a {tuple(ft.shape[-2:])} map to {(h, w)}: pooling only shrinks")
    return F.adaptive_avg_pool2d(ft, (h, w))


class FeatureProbe(Protocol):
    """What a feature method may learn about the run's models before training (built by the training layer)."""

    n_data: int  # training samples; a batch's ``inp.index`` lies in [0, n_data)

    def stages(self, role: Role, i: int = 0) -> tuple[str, ...]:
        """The stage names the student ``i`` or the teacher offers (``stage1 .. stageN``, ``embedding``)."""
        ...

    def shapes(self, role: Role, stages: Sequence[str], i: int = 0) -> dict[str, tuple[int, ...]]:
        """``{stage: shape}`` from one dry forward (batch first); an unknown stage is a UserError."""
        ...

    def stage_modules(self, role: Role, i: int = 0) -> dict[str, nn.Module]:
        """``{stage: the submodule whose output it is}`` of the spatial stages, shallow to deep (plain models)."""
        ...

    def classifier(self, role: Role, stage: str, i: int = 0) -> nn.Linear:
        """The model's linear classifier, which must read the global average of ``stage``'s map (UserError if
        not): the live module, so a student's weights keep their gradient and a teacher's stay frozen."""
        ...


class FeatureTeacher(Protocol):
    """A teaching signal whose frozen model's tapped maps can be read (the live :class:`Teacher`)."""

    def features(self, inp: StepInputs) -> dict[str, Tensor]:
        """``{stage: map}`` of the teacher on this step's batch, no gradient, computed once per step."""
        ...


def match_grid(ft: Tensor, fs_shape: Sequence[int]) -> Tensor:
    """A teacher map ``[B, C, H, W]`` pooled to ``(min(H, h), min(W, w))`` of a student map of shape ``fs_shape``.

    Cross-quality KD: the teacher read the full-resolution view; its map is averaged down to the student's grid.
    Vectors ``[B, D]`` (and maps already no larger than the student's) are returned unchanged.
    """
    if ft.dim() != 4 or len(fs_shape) != 4:
        return ft
    return pool_to(ft, (min(ft.shape[-2], int(fs_shape[-2])), min(ft.shape[-1], int(fs_shape[-1]))))


def matched_shape(t: Sequence[int], s: Sequence[int]) -> tuple[int, ...]:
    """The shape :func:`match_grid` gives a teacher map of shape ``t`` against a student map of shape ``s``."""
    if len(t) != 4 or len(s) != 4:
        return tuple(t)
    return (t[0], t[1], min(t[2], s[2]), min(t[3], s[3]))


class FeatureTerm(Term):
    """Base of the feature terms: reads ``student_stages`` of student ``i`` and ``teacher_stages`` of the teacher."""

    def __init__(self, name: str, teacher: FeatureTeacher, student_stages: Sequence[str],
                 teacher_stages: Sequence[str], weight: float) -> None:
        super().__init__(name, weight, distil=True)
        self.teacher = teacher  # a plain attribute: the frozen teacher is not part of the objective's state
        self.student_stages, self.teacher_stages = tuple(student_stages), tuple(teacher_stages)

    def maps(self, i: int, inp: StepInputs) -> tuple[list[Tensor], list[Tensor]]:
        """Student ``i``'s maps (with gradient) and the teacher's, pooled to the student's grids, stage by stage."""
        fs = [inp.features[i][s] for s in self.student_stages]
        tf = self.teacher.features(inp)
        return fs, [match_grid(tf[t], f.shape) for t, f in zip(self.teacher_stages, fs, strict=True)]

    def _pairs(self) -> str:
        return ", ".join(s if s == t else f"{s}/{t}" for s, t in zip(self.student_stages, self.teacher_stages))


def all_gathered(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each tensor concatenated over the DDP ranks (equal batch sizes per rank), or as it is in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)
