"""Streaming classification metrics, accumulated on the device and read once.

For predictions ``p = softmax(z)`` and labels ``y`` over ``n`` held-out samples:

* top-1 / top-5: share of samples whose label is among the 1 / 5 largest logits;
* NLL: mean ``-log p_y``; Brier: mean ``sum_c (p_c - 1[c = y])^2``; entropy: mean ``-sum_c p_c log p_c``;
* ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): 15 equal-width bins ``((m-1)/15, m/15]`` over the
  confidence ``c = max_c p_c``: ``ECE = sum_m |sum_{i in B_m} (acc_i - c_i)| / n``.

``update`` only launches kernels (no ``.item()``), so a loop can call it every batch without a host
sync; ``compute`` reads everything in one transfer. The sums are plain tensors, so they can be
checkpointed and all-reduced across processes.

torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")`` bins ``[lo, hi)`` and keeps a
confidence of exactly 1.0 in a bin of its own; the two agree unless a confidence falls exactly on a
bin edge (the tests compare them on confidences away from the edges).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SUMS = ("count", "correct1", "correct5", "nll", "brier", "entropy")


class MetricAccumulator:
    """Running sums for one model on one split. ``num_classes`` K, ``n_bins`` ECE bins."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", n_bins: int = 15,
                 per_class: bool = False) -> None:
        self.num_classes, self.n_bins, self.per_class = num_classes, n_bins, per_class
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(len(SUMS), device=device, dtype=dtype)
        self.bins = torch.zeros(3, n_bins, device=device, dtype=dtype)  # count, sum of accuracy, sum of confidence
        self.classes = torch.zeros(2, num_classes, device=device, dtype=dtype)  # count, correct

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch of logits ``[B, K]`` and labels ``[B]``."""
        self._add(torch.log_softmax(logits.float(), dim=1), labels)

    @torch.no_grad()
    def update_probs(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch given as probabilities ``[B, K]`` (a teaching signal, an ensemble)."""
        self._add(torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny)), labels)

    def _add(self, logp: Tensor, labels: Tensor) -> None:
        p = logp.exp()
        conf, pred = p.max(dim=1)
        correct = (pred == labels).to(self.sums.dtype)
        k = min(5, self.num_classes)
        top5 = (logp.topk(k, dim=1).indices == labels[:, None]).any(dim=1).to(self.sums.dtype)
        p_y = p.gather(1, labels[:, None]).squeeze(1)
        nll = -logp.gather(1, labels[:, None]).squeeze(1)
        brier = (p * p).sum(dim=1) - 2 * p_y + 1  # sum_c (p_c - 1[c=y])^2
        entropy = -(p * logp).sum(dim=1)
        batch = torch.stack([torch.ones_like(nll).sum(), correct.sum(), top5.sum(), nll.sum(), brier.sum(),
                             entropy.sum()])
        self.sums += batch.to(self.sums.dtype)
        # Bin m holds confidences in ((m-1)/M, m/M]: index ceil(c * M) - 1.
        index = (conf * self.n_bins).ceil().long().clamp(1, self.n_bins) - 1
        values = torch.stack([torch.ones_like(conf), correct.to(conf.dtype), conf]).to(self.bins.dtype)
        self.bins.scatter_add_(1, index.expand(3, -1), values)
        if self.per_class:
            self.classes[0].scatter_add_(0, labels, torch.ones_like(correct))
            self.classes[1].scatter_add_(0, labels, correct)

    def tensors(self) -> list[Tensor]:
        """The state, for checkpoints and all-reduce (in place)."""
        return [self.sums, self.bins, self.classes]

    def load_tensors(self, tensors: list[Tensor]) -> None:
        for mine, theirs in zip(self.tensors(), tensors):
            mine.copy_(theirs)

    def compute(self, reliability: bool = False) -> dict[str, Any]:
        """Metrics as Python numbers (one device-to-host transfer). Empty: every metric is NaN."""
        sums, bins, classes = (t.cpu() for t in self.tensors())
        n = float(sums[0])
        if n == 0:
            return dict.fromkeys(("top1", "top5", "ece", "nll", "brier", "entropy"), float("nan")) | {"n": 0}
        out: dict[str, Any] = {
            "top1": float(sums[1]) / n, "top5": float(sums[2]) / n,
            "ece": float((bins[1] - bins[2]).abs().sum()) / n,
            "nll": float(sums[3]) / n, "brier": float(sums[4]) / n, "entropy": float(sums[5]) / n, "n": int(n),
        }
        if self.per_class:
            out["per_class_top1"] = [float(c) / float(t) if t > 0 else None for t, c in zip(*classes.tolist())]
        if reliability:
            counts = bins[0].clamp_min(1)
            out["reliability"] = {"count": bins[0].long().tolist(), "accuracy": (bins[1] / counts).tolist(),
                                  "confidence": (bins[2] / counts).tolist()}
        return out


def pairwise_kl(logits: list[Tensor]) -> Tensor:
    """Mean KL(p_j || p_i) over ordered pairs i != j of a cohort's predictions (``[B, K]`` each); a scalar."""
    logp = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits])  # [N, B, K]
    p = logp.exp()
    n = len(logits)
    # sum_{i,j} KL(p_j || p_i) = sum_j sum_b sum_c p_j (log p_j - log p_i), summed over all i
    neg_entropy = (p * logp).sum(dim=2)  # [N, B]
    cross = torch.einsum("jbc,ibc->jib", p, logp)  # sum_c p_j log p_i
    total = (neg_entropy[:, None, :] - cross).sum(dim=(0, 1))  # diagonal terms are zero
    return total.mean() / (n * (n - 1))
