"""Held-out metrics of one model on one split: the classification metrics, calibration and teacher agreement.

:class:`HeldOutAccumulator` joins, batch by batch and without a host sync,

* :class:`~distillistic.core.metrics.MetricAccumulator`: top-1/top-5, ECE (equal-width), NLL, Brier, entropy
  (its keys and values are unchanged);
* :class:`~distillistic.core.calibration.CalibrationAccumulator`: ``ace`` (adaptive, equal-mass ECE; Nixon et al.
  2019), ``mce`` (Guo et al. 2017, eq. 5) and ``classwise_ece`` (Kull et al. 2019), over the same 15 bins;
* for a student with a teacher, Stanton et al. 2021's fidelity on held-out data:
  ``teacher_agreement = mean_i 1[argmax z_i = argmax t_i]`` and
  ``teacher_kl = mean_i KL(softmax(t_i) || softmax(z_i))`` (T = 1).

State: sum-reducible tensors (:meth:`tensors`: all_reduce them) and the per-sample (confidence, hit) pairs
``[N, 2]`` that ACE sorts (:meth:`samples`: all_gather them, then :meth:`load_samples`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distillistic.core.calibration import CalibrationAccumulator, kl_teacher_student, top1_agreement
from distillistic.core.metrics import MetricAccumulator

CALIBRATION_KEYS = ("ace", "mce", "classwise_ece")
AGREEMENT_KEYS = ("teacher_agreement", "teacher_kl")


class HeldOutAccumulator:
    """Running sums for one model on one held-out split; the interface of ``MetricAccumulator``."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", n_bins: int = 15,
                 per_class: bool = False) -> None:
        self.metrics = MetricAccumulator(num_classes, device, n_bins, per_class)
        self.calibration = CalibrationAccumulator(num_classes, n_bins, device)
        # rows scored against a teacher, sum of agreements, sum of KL(teacher || model)
        self.agreement = torch.zeros(3, device=device, dtype=self.metrics.sums.dtype)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, teacher: Tensor | None = None) -> None:
        """Add logits ``[B, K]`` and labels ``[B]``; with teacher logits ``[B, K]``, the agreement too."""
        self.metrics.update(logits, labels)
        self.calibration.update(logits, labels)
        if teacher is not None:
            self._agree(logits, teacher)

    @torch.no_grad()
    def update_probs(self, probs: Tensor, labels: Tensor, teacher: Tensor | None = None) -> None:
        """Add probabilities ``[B, K]`` (an ensemble, a teaching signal); ``teacher`` as in :meth:`update`."""
        self.metrics.update_probs(probs, labels)
        self.calibration.update_probs(probs, labels)
        if teacher is not None:  # log p is a logit vector of p (log_softmax(log p) = log p)
            self._agree(torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny)), teacher)

    def _agree(self, logits: Tensor, teacher: Tensor) -> None:
        n = torch.full((), logits.shape[0], device=self.agreement.device, dtype=self.agreement.dtype)
        batch = torch.stack([n, top1_agreement(logits, teacher).to(n.dtype) * n,
                             kl_teacher_student(teacher, logits).to(n.dtype) * n])
        self.agreement += batch

    def tensors(self) -> list[Tensor]:
        """The sum-reducible state (checkpoints, an in-place all_reduce(SUM))."""
        return [*self.metrics.tensors(), *self.calibration.tensors(), self.agreement]

    def samples(self) -> Tensor:
        """Per-sample ``[N, 2]`` (confidence, hit) for ACE: gather these across processes, not sum them."""
        return self.calibration.samples()

    def load_samples(self, samples: Tensor) -> None:
        self.calibration.load_samples(samples)

    def compute(self, reliability: bool = False) -> dict[str, Any]:
        """``MetricAccumulator.compute``'s keys, then ``ace``, ``mce``, ``classwise_ece`` and, when a teacher was
        given, ``teacher_agreement`` and ``teacher_kl`` (NaN when empty)."""
        out = self.metrics.compute(reliability=reliability)
        cal = self.calibration.compute()
        out |= {k: cal[k] for k in CALIBRATION_KEYS}
        n, agree, kl = self.agreement.tolist()
        if n > 0:
            out |= {"teacher_agreement": agree / n, "teacher_kl": kl / n}
        return out
