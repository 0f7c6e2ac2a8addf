"""KDCL-MinLogit (Guo et al. 2020, CVPR, Online Knowledge Distillation via Collaborative Learning).

A cohort learns from one ensemble target built from every member's detached logits:
``L_m = (1 − α)·CE(z_m, y) + α·T²·KL(softmax(min_j (z_j − z_j,y)/T) ‖ softmax(z_m/T))``. The paper's members read
differently augmented copies of the images (sec. 3.1): ``--peer-views independent``. No reference code was
published; this follows sec. 3.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.logits import Transform
from distillistic.core.objective import Distill, Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Setting

SPEC = MethodSpec(
    "kdcl", "Guo et al. 2020, Online Knowledge Distillation via Collaborative Learning (CVPR): KDCL-MinLogit",
    "L_m = (1-a) CE(z_m, y) + a T² KL(softmax(min_j (z_j - z_j,y)/T) ‖ softmax(z_m/T)), target detached",
    family="cohort", min_students=2, default_students=2, params=(LOGIT_STANDARDIZE,),
    reads=("temperature", "divergence"),
    defaults=(Setting("temperature", "—", "no code was published",
                      "the thesis's T = 1, as the other cohort methods", ours="1"),
              Setting("alpha", "Guo et al. 2020, sec. 3: CE plus the distillation term", "no code was published",
                      "the thesis's α = 0.5", ours="0.5")))


def kdcl_min_logit_target(logits: Sequence[Tensor] | Tensor, y: Tensor, temperature: float) -> Tensor:
    """KDCL-MinLogit (Guo et al. 2020, CVPR, sec. 3.2): the ensemble target shared by all ``M`` members.

    ``z̃^m = z^m − z^m_y·1`` (each member's logits relative to its true-class logit, so ``z̃^m_y = 0``), then the
    element-wise minimum over members, ``softmax(min_m z̃^m / T)``: for each class the member that separates it
    most from the true class. ``logits``: ``M`` tensors ``[B, K]`` or one ``[M, B, K]`` → detached ``[B, K]``.
    """
    stacked = torch.stack(list(logits)) if not isinstance(logits, Tensor) else logits
    stacked = at_least_float32(stacked.detach())
    index = y.long().view(1, -1, 1).expand(stacked.shape[0], -1, 1)
    relative = stacked - stacked.gather(2, index)
    return F.softmax(relative.amin(dim=0) / temperature, dim=-1)


class MinLogit:
    """KDCL-MinLogit's ensemble target (Guo et al. 2020, sec. 3.2), shared by every member of the cohort:
    ``softmax(min_m (z^m − z^m_y) / T)`` from the members' detached logits (each on its own view of the sample
    with ``--peer-views independent``)."""

    pairwise = False
    of_logits = True

    def __init__(self, name: str = "kdcl") -> None:
        self.name = name

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        """The shared target; with logit standardisation the members' logits are z-scored per sample before the
        min and the temperature (Sun et al. 2024)."""
        if len(inp.logits) < 2:
            raise ValueError("KDCL needs a cohort of at least 2 students")
        z = torch.stack([at_least_float32(z.detach()) for z in inp.logits])
        q = kdcl_min_logit_target(transform(z) if transform else z, inp.labels, temperature)
        return [q.unsqueeze(0)] * len(inp.logits)

    def describe(self, temperature: float) -> str:
        t = "" if temperature == 1 else f"/{temperature:g}"
        return f"softmax(min_m (z_m - z_m,y){t})"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("kdcl", MinLogit(), cfg.divergence, cfg.temperature, standardize=cfg.logit_standardize),)


register_method(SPEC, terms)
