"""Label smoothing (Szegedy et al. 2016): the student's target is ``(1 − ε)·onehot(y) + ε/K``; no teacher.

The comparison Yuan et al. 2020 draw with Tf-KD: a uniform virtual teacher. ``ε = 0`` is the baseline bit for
bit (PyTorch's plain cross-entropy path).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import Interval, MethodSpec, Param, Setting, uniform

SPEC = MethodSpec(
    "ls", "Szegedy et al. 2016, Rethinking the Inception Architecture (CVPR): label smoothing",
    "L = CE((1-ε) onehot(y) + ε/K, softmax(z)); ε = 0 is the baseline",
    defaults=(Setting("label_smoothing", "Szegedy et al. 2016, sec. 7: ε = 0.1, u = 1/K",
                      "PyTorch F.cross_entropy(label_smoothing=ε): (1 − ε)·onehot + ε/K; Tf-KD's "
                      "my_loss_function.py:54-67 puts ε/(K − 1) on the other classes instead",
                      "the paper's ε/K (PyTorch's)"),),
    params=(Param("label_smoothing", float, 0.1, "smoothing eps of the target (1-eps) onehot + eps/K, in [0, 1)",
                  cite="Szegedy et al. 2016, sec. 7 (ε = 0.1 on ImageNet)", range=Interval(0.0, 1.0, open_high=True),
                  space=uniform(0.0, 0.3)),))


def label_smoothing_cross_entropy(z: Tensor, y: Tensor, eps: float) -> Tensor:
    """Cross-entropy of ``z`` ``[B, K]`` to the target ``(1 − ε)·onehot(y) + ε/K``, mean over the batch.

    Delegates to ``F.cross_entropy(z, y, label_smoothing=eps)``: with class indices PyTorch applies the same
    ``(1 − ε)·onehot + ε/K`` target without materialising a ``[B, K]`` tensor, and at ``eps = 0`` takes the very
    code path of plain cross-entropy, so a run with ``eps = 0`` is bitwise identical to the baseline (a soft
    target ``onehot`` sums ``0·log p`` terms and a different reduction, equal only to rounding).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1], got {eps}")
    return F.cross_entropy(at_least_float32(z), y.long(), label_smoothing=eps)


class LabelSmoothingCE(Term):
    """The supervised term of ``ls``; at ``ε = 0`` PyTorch's plain cross-entropy, the baseline's term."""

    def __init__(self, eps: float) -> None:
        super().__init__("ce", 1.0, distil=False)
        self.eps = eps

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        return label_smoothing_cross_entropy(z, inp.labels, self.eps)

    def describe(self) -> str:
        return f"CE((1-{self.eps:g})·onehot(y) + {self.eps:g}/K, softmax(z))"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return ()


register_method(SPEC, terms, supervised=lambda cfg: LabelSmoothingCE(cfg.label_smoothing))
