"""Feature-distillation terms: FitNets, AT, SP, RKD and CRD on the stages a run taps (DESIGN.md section 8).

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

import logging
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distillistic.core import feature_losses as fl
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs

log = logging.getLogger("distillistic")
Role = Literal["student", "teacher"]


class FeatureProbe(Protocol):
    """What a feature method may learn about the run's models before training (built by the training layer)."""

    n_data: int  # training samples; a batch's ``inp.index`` lies in [0, n_data)

    def stages(self, role: Role, i: int = 0) -> tuple[str, ...]:
        """The stage names the student ``i`` or the teacher offers (``stage1 .. stageN``, ``embedding``)."""
        ...

    def shapes(self, role: Role, stages: Sequence[str], i: int = 0) -> dict[str, tuple[int, ...]]:
        """``{stage: shape}`` from one dry forward (batch first); an unknown stage is a UserError."""
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
    return fl.pool_to(ft, (min(ft.shape[-2], int(fs_shape[-2])), min(ft.shape[-1], int(fs_shape[-1]))))


def _matched_shape(t: Sequence[int], s: Sequence[int]) -> tuple[int, ...]:
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


class FitNet(FeatureTerm):
    """FitNets hint (Romero et al. 2015, eq. 3): ``mean((r_i(F_s) - F_t)^2)`` with a trained regressor per student."""

    def __init__(self, teacher: FeatureTeacher, student_stage: str, teacher_stage: str, weight: float,
                 student_shapes: Sequence[Sequence[int]], teacher_shape: Sequence[int]) -> None:
        super().__init__("fitnet", teacher, (student_stage,), (teacher_stage,), weight)
        self.regressors = nn.ModuleList(fl.make_regressor(s, _matched_shape(teacher_shape, s)) for s in student_shapes)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return fl.hint_loss(self.regressors[i](fs), ft)

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.regressors[i].parameters()

    def describe(self) -> str:
        return f"MSE(r(F_s), F_t)[{self._pairs()}]"


class Attention(FeatureTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017): ``sum_stages mean (a_s - a_t)^2``, ``a = norm(mean_c F^2)``."""

    def __init__(self, teacher: FeatureTeacher, stages: Sequence[str], weight: float) -> None:
        super().__init__("at", teacher, stages, stages, weight)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        fs, ft = self.maps(i, inp)
        return fl.at_loss(fs, ft, beta=1.0)

    def describe(self) -> str:
        return f"AT(F_s, F_t)[{self._pairs()}]"


class Similarity(FeatureTerm):
    """Similarity preserving (Tung & Mori 2019): ``||G_s - G_t||_F^2 / B^2`` on one stage's batch Gram matrices."""

    def __init__(self, teacher: FeatureTeacher, student_stage: str, teacher_stage: str, weight: float) -> None:
        super().__init__("sp", teacher, (student_stage,), (teacher_stage,), weight)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return fl.sp_loss(fs, ft)

    def describe(self) -> str:
        return f"SP(F_s, F_t)[{self._pairs()}]"


class Relational(FeatureTerm):
    """Relational KD (Park et al. 2019): ``w_d·distance + w_a·angle`` on the embeddings."""

    def __init__(self, teacher: FeatureTeacher, weight: float, w_dist: float, w_angle: float) -> None:
        super().__init__("rkd", teacher, ("embedding",), ("embedding",), weight)
        self.w_dist, self.w_angle = w_dist, w_angle

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        (fs,), (ft,) = self.maps(i, inp)
        return fl.rkd_loss(fs, ft, self.w_dist, self.w_angle)["loss"]

    def describe(self) -> str:
        return f"({self.w_dist:g}·RKD_D + {self.w_angle:g}·RKD_A)(e_s, e_t)"


def _all_gathered(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each tensor concatenated over the DDP ranks (equal batch sizes per rank), or as it is in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


class Contrastive(FeatureTerm):
    """CRD (Tian et al. 2020): NCE over ``K`` negatives of a momentum memory bank keyed by the sample's index.

    One :class:`CRDHead` per student (its two embeddings train with the student; its banks and normalisers are
    buffers). The banks update after the optimizer step with the embeddings of every DDP rank, so that all
    ranks keep equal banks (RepDistiller updates inside the forward: the same values in one process).
    Negatives are drawn from a ``torch.Generator`` seeded with ``seed``, whose state is this term's
    extra state in the checkpoint, so a resumed run draws the same negatives.
    """

    def __init__(self, teacher: FeatureTeacher, weight: float, dim_s: Sequence[int], dim_t: int, n_data: int,
                 dim: int, k: int, temperature: float, momentum: float, seed: int) -> None:
        super().__init__("crd", teacher, ("embedding",), ("embedding",), weight)
        init = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleList(fl.CRDHead(d, dim_t, n_data, dim, k, temperature, momentum, init) for d in dim_s)
        self.seed, self.k, self.temperature = seed, k, temperature
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None  # a restored generator state, applied when the generator is made
        self._updates: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # student -> (idx, v_s, v_t) of this step

    def _draws(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        """:func:`crd_loss` against the banks as they were before this step; the banks update in :meth:`after_step`."""
        assert inp.index is not None, "CRD needs the samples' dataset indices"
        (fs,), (ft,) = self.maps(i, inp)
        idx = inp.index.to(fs.device, non_blocking=True)
        head = typing.cast(fl.CRDHead, self.heads[i])
        v_s, v_t = head.embed_s(fs), head.embed_t(ft.detach())
        out_s, out_t = head.memory(v_s, v_t, idx, generator=self._draws(fs.device), update=False)
        self._updates[i] = (idx, v_s.detach(), v_t.detach())
        return fl.nce_loss(out_s, head.memory.n_data) + fl.nce_loss(out_t, head.memory.n_data)

    def after_step(self, inp: StepInputs) -> None:
        """The momentum update of every student's banks with this step's embeddings, of every DDP rank."""
        for i, update in sorted(self._updates.items()):
            typing.cast(fl.CRDHead, self.heads[i]).memory.update_(*_all_gathered(update))
        self._updates.clear()

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.heads[i].parameters()

    def get_extra_state(self) -> Any:
        state = self._generator.get_state() if self._generator is not None else self._pending
        return {"generator": state}

    def set_extra_state(self, state: Any) -> None:
        self._generator, self._pending = None, state.get("generator")

    def describe(self) -> str:
        return f"CRD(e_s, e_t; K={self.k}, τ={self.temperature:g})"
