"""SimKD (Chen, Mei, Wang, Feng & Chen 2022, CVPR): the student reuses the teacher's classifier through a projector.

The student's last stage map (average-pooled to the teacher's grid when larger) goes through a trained
projector (1x1 conv, 3x3 conv, 1x1 conv, each + BN + ReLU, bottleneck ``C_t / f``, f = 2) that is matched to
the teacher's last stage map by MSE; the projection, globally averaged, is classified by the teacher's own
(frozen) classifier. ``L = c·CE(z, y) + β·MSE(P(F_s), F_t)`` with c = 0, β = 1 [+ ``feature_kd``·T²·KL], and the
student *is* backbone + projector + teacher classifier: its predictions ``z`` are the reused classifier's, in
training, evaluation, export and prediction. Reference: DefangChen/SimKD, ``models/util.py`` (``SimKD``),
``helper/loops.py`` and ``train_student.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, pool_to
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import CrossEntropy, Term
from distillistic.core.signals import StepInputs
from distillistic.errors import UserError
from distillistic.methods.features import last_spatial_stages, parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    MethodSpec,
    Param,
    Setting,
    at_least,
    int_range,
)

WEIGHT = 1.0  # SimKD README.md: train_student.py --distill simkd -c 0 -d 0 -b 1
_SIMKD = "DefangChen/SimKD@2b389c3"
SPEC = MethodSpec(
    "simkd", "Chen, Mei, Wang, Feng & Chen 2022, Knowledge Distillation with the Reused Teacher Classifier (CVPR)",
    "L = c CE(z, y) + β MSE(P(F_s), F_t), z = W_t·avg(P(F_s)): the teacher's classifier W_t on the projected "
    "last stage (c = 0, β = 1) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("simkd_factor", int, 2, "bottleneck factor f of the projector (C_t / f channels inside)",
                  cite=f"{_SIMKD} train_student.py:67 --factor 2", range=at_least(1), allowed="a whole number > 0",
                  space=int_range(1, 8)),
            Param("simkd_ce", float, 0.0, "weight c of CE(z, y) on the student's predictions",
                  cite=f"{_SIMKD} README.md: -c 0 for simkd", range=at_least(0.0), allowed="a weight >= 0")),
    notes="the exported student includes the projector and the teacher's classifier",
    defaults=(
        Setting("feature_weight", "— (the paper's text was not checked here)",
                f"{_SIMKD} README.md:43 --distill simkd -c 0 -d 0 -b 1", ours="1"),
        Setting("feature_kd", "— (the paper's text was not checked here)", f"{_SIMKD} README.md:43 -d 0"),
        Setting("simkd_ce", "— (the paper's text was not checked here)", f"{_SIMKD} README.md:43 -c 0"),
        Setting("simkd_factor", "— (the paper's text was not checked here)",
                f"{_SIMKD} train_student.py:67 --factor 2; README.md:63-65 f = 2, 4, 8 (2 best)"),
        KD_T_FOR_FEATURES,
    ),
    **{**FEATURE, "weights": ("feature_weight", "feature_kd", "simkd_ce")})


def projector(c_in: int, c_out: int, factor: int = 2) -> nn.Sequential:
    """SimKD's ``transfer`` (models/util.py lines 201-213): 1x1 conv to ``c_out // f``, 3x3 conv, 1x1 conv to
    ``c_out``, each without bias and followed by BN + ReLU; the layer indices are the reference's (0 .. 8)."""
    mid = c_out // factor
    if mid < 1:
        raise UserError(f"algo simkd: --simkd-factor {factor} leaves no channel of the teacher's {c_out}; choose "
                        f"a factor of at most {c_out}")
    return _layers(c_in, mid, c_out)


def _layers(c_in: int, mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def simkd_loss(projected: Tensor, ft: Tensor) -> Tensor:
    """``MSE(P(F_s), F_t)`` over every element (SimKD ``nn.MSELoss()``), the teacher's map ``ft`` ``[B, C_t, H, W]``
    average-pooled to the projection's grid where larger (the reference's spatial alignment)."""
    grid = (min(ft.shape[-2], projected.shape[-2]), min(ft.shape[-1], projected.shape[-1]))
    return F.mse_loss(_full(projected), _full(pool_to(ft.detach(), grid)))


class Reused(nn.Module):
    """The SimKD student: ``student``'s ``stage`` map -> pooled to ``size`` if larger -> projector -> global mean ->
    the teacher's ``classifier``. The logits ``[B, K]`` are the reused classifier's; the projection of the last
    forward stays in :attr:`projected` (with its graph) for the loss, so the projector runs once per step."""

    size: Tensor
    # the student's own classifier (and whatever follows its stage) never reaches the loss: under torchrun,
    # DistributedDataParallel must look for the parameters without a gradient instead of waiting for them
    ddp_find_unused_parameters = True

    def __init__(self, student: nn.Module, stage: nn.Module, projector: nn.Module, classifier: nn.Linear,
                 size: Sequence[int]) -> None:
        super().__init__()
        self.student, self.projector, self.classifier = student, projector, classifier
        self.classifier.requires_grad_(False)  # the teacher's, frozen (it is not in SimKD's trainable list)
        self._stage = (stage,)  # a submodule of student, outside the registry: its weights are the student's
        self.grid = (int(size[0]), int(size[1]))
        self.register_buffer("size", torch.tensor(self.grid))  # saved, so that the export rebuilds the module
        self.projected: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> logits ``[B, K]``."""
        box: list[Tensor] = []
        handle = self._stage[0].register_forward_hook(lambda module, args, out: box.append(out))
        try:
            self.student(x)
        finally:
            handle.remove()
        f = box[-1]
        grid = (min(f.shape[-2], self.grid[0]), min(f.shape[-1], self.grid[1]))
        projected = self.projector(pool_to(f, grid))
        self.projected = projected if torch.is_grad_enabled() else None  # for the loss; evaluation keeps nothing
        return self.classifier(projected.mean((2, 3)))


class ReusedClassifier(FeatureTerm):
    """SimKD's term: ``MSE(P(F_s), F_t)``, the teacher's map pooled to the projection's grid when larger."""

    def __init__(self, teacher: FeatureTeacher, teacher_stage: str, weight: float, projectors: Sequence[nn.Module],
                 stages: Sequence[nn.Module], classifier: nn.Linear, size: Sequence[int]) -> None:
        super().__init__("simkd", teacher, (), (teacher_stage,), weight)
        # owned by the students' models (Reused), so kept out of this term's registry and state
        self._parts = (tuple(projectors), tuple(stages), classifier)
        self.size = tuple(size)
        self._models: list[Reused | None] = [None] * len(projectors)

    def student_model(self, i: int, model: nn.Module) -> nn.Module:
        projectors, stages, classifier = self._parts
        reused = Reused(model, stages[i], projectors[i], copy.deepcopy(classifier), self.size)
        self._models[i] = reused
        return reused

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        reused = self._models[i]
        assert reused is not None, "simkd: student_model was not called for this student"
        assert reused.projected is not None, "simkd reads the projection of this step's forward"
        projected, reused.projected = reused.projected, None
        return simkd_loss(projected, self.teacher.features(inp)[self.teacher_stages[0]])

    def describe(self) -> str:
        return f"MSE(P(F_s), F_t)[{self.teacher_stages[0]}], z = W_t·avg(P(F_s))"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "simkd")
    s_stage, t_stage = last_spatial_stages(probe, cfg, "simkd", "projects the last stage map")
    classifier = probe.classifier("teacher", t_stage)  # refused unless it classifies the stage's global mean
    t_shape = probe.shapes("teacher", (t_stage,))[t_stage]
    projectors = [projector(probe.shapes("student", (s_stage,), i)[s_stage][1], t_shape[1], cfg.simkd_factor)
                  for i in range(ctx.students)]
    stages = [probe.stage_modules("student", i)[s_stage] for i in range(ctx.students)]
    term = ReusedClassifier(teacher, t_stage, weight(cfg, WEIGHT), projectors, stages, classifier, t_shape[2:])
    return with_kd(cfg, ctx, term)


def rebuild(cfg: Config, model: nn.Module, state: Mapping[str, Tensor],
            stages: Callable[[], dict[str, nn.Module]]) -> nn.Module:
    """The :class:`Reused` student around a freshly built plain ``model``, shaped from its saved ``state``."""
    if "projector.0.weight" not in state:
        return model
    mid, c_in = state["projector.0.weight"].shape[:2]
    c_out, classes = state["projector.6.weight"].shape[0], state["classifier.weight"].shape[0]
    head = _layers(int(c_in), int(mid), int(c_out))
    spatial = stages()
    return Reused(model, spatial[list(spatial)[-1]], head, nn.Linear(int(c_out), int(classes)),
                  [int(v) for v in state["size"]])


register_method(SPEC, terms, supervised=lambda cfg: CrossEntropy(cfg.simkd_ce), rebuild_student=rebuild)
