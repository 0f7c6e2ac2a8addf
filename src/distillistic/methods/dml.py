"""Deep mutual learning (Zhang et al. 2018) and DML_e, its variant against the peers' mean (the thesis).

A cohort of students trains together; each learns from the others' detached softened predictions:

* ``dml``:   ``L_i = (1 − α)·CE(z_i, y) + α·mean_(j≠i) KL(softmax(z_j/T) ‖ softmax(z_i/T))``
* ``dml_e``: ``L_i = (1 − α)·CE(z_i, y) + α·KL(mean_(j≠i) softmax(z_j/T) ‖ softmax(z_i/T))``

With ``--peer-views independent`` each student reads its own augmented view of a sample.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from distillistic.config import Config
from distillistic.core.logits import Transform
from distillistic.core.objective import Distill, Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, soft
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Setting

_COHORT: dict[str, Any] = dict(family="cohort", min_students=2, default_students=3, params=(LOGIT_STANDARDIZE,),
               reads=("temperature", "divergence"), defaults=(
    Setting("temperature", "Zhang et al. 2018, sec. 3: plain softmax (T = 1)",
            "YingZhangDUT/Deep-Mutual-Learning@efd9a08, train_image_classifier.py: kl_loss_compute (softmax, T = 1)",
            ours="1"),
    Setting("alpha", "Zhang et al. 2018, sec. 3: L = CE + KL (weights 1 and 1)",
            "train_image_classifier.py: net loss = CE + mean of the KL terms",
            "the thesis's α = 0.5: 0.5·CE + 0.5·KL, the authors' direction at half the step", ours="0.5"),
))
SPEC = MethodSpec(
    "dml", "Zhang et al. 2018, Deep Mutual Learning (CVPR)",
    "L_i = (1-a) CE(z_i, y) + a mean_(j≠i) KL(softmax(z_j/T) ‖ softmax(z_i/T)), peers detached", **_COHORT)
SPEC_E = MethodSpec(
    "dml_e", "DML against the mean of the peers (thesis)",
    "L_i = (1-a) CE(z_i, y) + a KL(mean_(j≠i) softmax(z_j/T) ‖ softmax(z_i/T))", **_COHORT)


class Peers:
    """The other students' softened predictions (detached): each peer on its own, or their mean."""

    def __init__(self, mode: Literal["pairwise", "mean"], name: str) -> None:
        if mode not in ("pairwise", "mean"):
            raise ValueError(f"Peers mode must be pairwise or mean, not {mode!r}")
        self.mode, self.name = mode, name
        self.pairwise = mode == "pairwise"
        self.of_logits = True

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        """Student ``i``'s targets: ``[M − 1, B, K]`` (pairwise) or ``[1, B, K]`` (mean); slices, no host lists.
        With logit standardisation the peers' logits are z-scored per sample before the temperature."""
        n = len(inp.logits)
        if n < 2:
            raise ValueError("Peers needs a cohort of at least 2 students")
        z = torch.stack([at_least_float32(z.detach()) for z in inp.logits])
        p = torch.softmax((transform(z) if transform else z) / temperature, dim=-1)
        if self.pairwise:
            return [torch.cat([p[:i], p[i + 1:]]) for i in range(n)]
        total = p.sum(dim=0)
        return [((total - p[i]) / (n - 1)).unsqueeze(0) for i in range(n)]

    def describe(self, temperature: float) -> str:
        peer = soft("z_j", temperature)
        return peer if self.pairwise else f"mean_(j≠i) {peer}"


def terms_pairwise(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("dml", Peers("pairwise", name="dml"), cfg.divergence, cfg.temperature,
                    standardize=cfg.logit_standardize),)


def terms_mean(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("dml_e", Peers("mean", name="dml_e"), cfg.divergence, cfg.temperature,
                    standardize=cfg.logit_standardize),)


register_method(SPEC, terms_pairwise)
register_method(SPEC_E, terms_mean)
