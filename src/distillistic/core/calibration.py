"""Calibration of held-out predictions, agreement with a teacher, and temperature scaling.

For predictions ``p = softmax(z)`` (``[N, K]``), labels ``y`` (``[N]``), top-label confidence ``c_i = max_k p_ik``
and hit ``a_i = 1[argmax_k p_ik = y_i]``:

* ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): M equal-width bins ``((m-1)/M, m/M]`` over ``c``,
  ``ECE = sum_m |sum_{i in B_m} (a_i - c_i)| / N`` (the same bins as ``metrics.MetricAccumulator``).
* MCE (Guo et al. 2017, eq. 5): ``max`` over non-empty equal-width bins of ``|acc(B_m) - conf(B_m)|``.
* ACE, adaptive ECE (Nixon et al. 2019, top-label form): sort by ``c``, split into M groups whose sizes differ by at
  most one (the first ``N mod M`` groups hold one more, as ``Tensor.tensor_split``), then the ECE formula over
  these groups. Nixon et al. also average over all K classes; the top-label form is what torch-uncertainty's
  ``AdaptiveCalibrationError`` computes.
* classwise ECE (Kull et al. 2019; Nixon et al. 2019's SCE): for each class k, equal-width bins over ``p_ik`` with
  hit ``1[y_i = k]``; ``cwECE = (1/K) sum_k sum_m |sum_{i in B_mk} (1[y_i = k] - p_ik)| / N``.

Agreement with a teacher (Stanton et al. 2021, "Does knowledge distillation really work?"): top-1 agreement
``mean_b 1[argmax zs_b = argmax zt_b]`` and predictive KL ``mean_b KL(softmax(zt_b/T) || softmax(zs_b/T))``.

Temperature scaling (Guo et al. 2017, sec. 4.2): one ``T > 0`` minimising the NLL of ``softmax(z / T)`` on a
held-out set; it changes confidences but not the argmax.

Empty inputs give NaN metrics, as ``metrics.MetricAccumulator`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

NAN = float("nan")


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _probs(scores: Tensor, probs: bool) -> Tensor:
    """``p`` ``[N, K]`` in float32 from logits, or taken as is when ``probs``."""
    return scores.float() if probs else torch.softmax(scores.float(), dim=1)


def bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Equal-width bin of each value in ``[0, 1]`` (any shape): bin m holds ``((m-1)/M, m/M]``, and 0 goes to bin 0.

    Index ``ceil(c M) - 1``, as ``metrics.MetricAccumulator``; torchmetrics bins ``[lo, hi)`` instead, so the two
    differ only for a value exactly on an edge.
    """
    return (conf * n_bins).ceil().long().clamp(1, n_bins) - 1


def equal_width_sums(conf: Tensor, hits: Tensor, n_bins: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-bin ``[3, M]`` sums (count, hits, confidence) of confidences ``[N]`` and hits ``[N]`` in {0, 1}."""
    sums = torch.zeros(3, n_bins, device=conf.device, dtype=dtype)
    values = torch.stack([torch.ones_like(conf), hits.to(conf.dtype), conf]).to(dtype)
    sums.scatter_add_(1, bin_index(conf, n_bins).expand(3, -1), values)
    return sums


def ece_from_sums(sums: Tensor) -> float:
    """ECE from ``[3, M]`` bin sums (count, hits, confidence): ``sum_m |hits_m - conf_m| / N``; NaN when empty."""
    n = float(sums[0].sum())
    return float((sums[1] - sums[2]).abs().sum()) / n if n > 0 else NAN


def classwise_ece_from_sums(sums: Tensor) -> float:
    """Classwise ECE from per-class ``[K, 3, M]`` bin sums: the mean over k of each class's ECE; NaN when empty."""
    n = float(sums[0, 0].sum())  # every sample lands in one bin of every class
    return float((sums[:, 1] - sums[:, 2]).abs().sum()) / (n * sums.shape[0]) if n > 0 else NAN


def mce_from_sums(sums: Tensor) -> float:
    """MCE from ``[3, M]`` bin sums: ``max`` over non-empty bins of ``|acc - conf|``; NaN when all are empty."""
    full = sums[0] > 0
    if not bool(full.any()):
        return NAN
    return float(((sums[1, full] - sums[2, full]) / sums[0, full]).abs().max())


def adaptive_ece(conf: Tensor, hits: Tensor, n_bins: int = 15) -> float:
    """ACE (Nixon et al. 2019, top-label): ECE over M equal-mass groups of the confidences ``[N]`` sorted upwards.

    Groups hold ``ceil(N/M)`` or ``floor(N/M)`` samples (the larger ones first); for N < M some are empty and
    count for nothing. Ties are ordered by position (a stable sort), so the result does not depend on the device.
    """
    n = conf.numel()
    if n == 0:
        return NAN
    conf64 = conf.to(_state_dtype(conf.device))
    order = torch.sort(conf64, stable=True).indices
    gap = hits.to(conf64.dtype)[order] - conf64[order]
    # group g covers sorted positions [start_g, start_{g+1}); tensor_split's sizes, without a Python loop
    sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long, device=conf.device)
    sizes[: n % n_bins] += 1
    group = torch.repeat_interleave(torch.arange(n_bins, device=conf.device), sizes)
    per_group = torch.zeros(n_bins, dtype=conf64.dtype, device=conf.device).scatter_add_(0, group, gap)
    return float(per_group.abs().sum()) / n


def classwise_sums(p: Tensor, labels: Tensor, n_bins: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-class bin sums ``[K, 3, M]`` (count, hits ``1[y = k]``, sum of ``p_k``) for probabilities ``[N, K]``."""
    n, k = p.shape
    index = bin_index(p, n_bins) + n_bins * torch.arange(k, device=p.device)  # [N, K], flat over (class, bin)
    hits = (labels[:, None] == torch.arange(k, device=p.device)).to(p.dtype)  # one_hot checks labels on the host
    sums = torch.zeros(3, k * n_bins, device=p.device, dtype=dtype)
    values = torch.stack([torch.ones_like(p), hits, p]).reshape(3, n * k).to(dtype)
    sums.scatter_add_(1, index.reshape(1, n * k).expand(3, -1), values)
    return sums.reshape(3, k, n_bins).transpose(0, 1)


def reliability(scores: Tensor, labels: Tensor, n_bins: int = 15, probs: bool = False) -> dict[str, list[Any]]:
    """Reliability diagram data over equal-width bins: per-bin ``count``, mean ``accuracy`` and mean
    ``confidence`` (0 for an empty bin), and the bin edges ``edges`` (M + 1 values), for logits or
    probabilities ``[N, K]`` and labels ``[N]``."""
    conf, pred = _probs(scores, probs).max(dim=1)
    sums = equal_width_sums(conf, pred == labels, n_bins, _state_dtype(scores.device)).cpu()
    counts = sums[0].clamp_min(1)
    return {"count": sums[0].long().tolist(), "accuracy": (sums[1] / counts).tolist(),
            "confidence": (sums[2] / counts).tolist(), "edges": [m / n_bins for m in range(n_bins + 1)]}


def calibration_report(scores: Tensor, labels: Tensor, n_bins: int = 15, probs: bool = False) -> dict[str, float]:
    """``ece``, ``ace``, ``mce``, ``classwise_ece`` and ``n`` of logits (or, with ``probs``, probabilities)
    ``[N, K]`` against labels ``[N]``; see the module docstring for the definitions."""
    acc = CalibrationAccumulator(scores.shape[1], n_bins, scores.device)
    if probs:
        acc.update_probs(scores, labels)
    else:
        acc.update(scores, labels)
    return acc.compute()


class CalibrationAccumulator:
    """Everything ``calibration_report`` needs, gathered batch by batch on the device without a host sync.

    State: ``bins`` ``[3, M]`` top-label sums and ``classwise`` ``[K, 3, M]`` per-class sums (sum-reducible:
    all_reduce them, see :meth:`tensors`), and per-sample ``(confidence, hit)`` pairs ``[N, 2]`` for ACE, which needs
    every confidence to sort them (gather these across processes, see :meth:`samples`).
    """

    def __init__(self, num_classes: int, n_bins: int = 15, device: torch.device | str = "cpu") -> None:
        self.num_classes, self.n_bins = num_classes, n_bins
        self.dtype = _state_dtype(torch.device(device))
        self.bins = torch.zeros(3, n_bins, device=device, dtype=self.dtype)
        self.classwise = torch.zeros(num_classes, 3, n_bins, device=device, dtype=self.dtype)
        self._samples: list[Tensor] = []

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch of logits ``[B, K]`` and labels ``[B]``."""
        self._add(_probs(logits, probs=False), labels)

    @torch.no_grad()
    def update_probs(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch given as probabilities ``[B, K]`` (a teaching signal, an ensemble)."""
        self._add(_probs(probs, probs=True), labels)

    def _add(self, p: Tensor, labels: Tensor) -> None:
        conf, pred = p.max(dim=1)
        hits = (pred == labels).to(conf.dtype)
        self.bins += equal_width_sums(conf, hits, self.n_bins, self.dtype)
        self.classwise += classwise_sums(p, labels, self.n_bins, self.dtype)
        self._samples.append(torch.stack([conf, hits], dim=1).to(self.dtype))

    def tensors(self) -> list[Tensor]:
        """The sum-reducible state ``[bins, classwise]``, for checkpoints and an in-place all_reduce(SUM)."""
        return [self.bins, self.classwise]

    def samples(self) -> Tensor:
        """Per-sample ``[N, 2]`` (confidence, hit) in update order. Not sum-reducible: across processes use
        all_gather (pad to the largest N first, as ranks may hold different counts) and :meth:`load_samples`."""
        if not self._samples:
            return torch.zeros(0, 2, device=self.bins.device, dtype=self.dtype)
        if len(self._samples) > 1:
            self._samples = [torch.cat(self._samples)]
        return self._samples[0]

    def load_tensors(self, tensors: list[Tensor]) -> None:
        for mine, theirs in zip(self.tensors(), tensors):
            mine.copy_(theirs)

    def load_samples(self, samples: Tensor) -> None:
        """Replace the per-sample state by ``[N, 2]`` (e.g. the gathered samples of every process)."""
        self._samples = [samples.to(self.bins.device, self.dtype)]

    def compute(self) -> dict[str, float]:
        """``ece``, ``ace``, ``mce``, ``classwise_ece`` and ``n`` as Python numbers (NaN when empty)."""
        bins, classwise, samples = self.bins.cpu(), self.classwise.cpu(), self.samples().cpu()
        return {"ece": ece_from_sums(bins), "ace": adaptive_ece(samples[:, 0], samples[:, 1], self.n_bins),
                "mce": mce_from_sums(bins), "classwise_ece": classwise_ece_from_sums(classwise),
                "n": int(bins[0].sum())}


def top1_agreement(zs: Tensor, zt: Tensor) -> Tensor:
    """Share of rows where student ``[B, K]`` and teacher ``[B, K]`` logits (or probabilities) have the same
    argmax (Stanton et al. 2021); a 0-dim tensor, so a loop can sum it without a host sync."""
    return (zs.argmax(dim=1) == zt.argmax(dim=1)).to(_state_dtype(zs.device)).mean()


def kl_teacher_student(zt: Tensor, zs: Tensor, temperature: float = 1.0) -> Tensor:
    """``mean_b KL(softmax(zt_b/T) || softmax(zs_b/T))`` for teacher and student logits ``[B, K]``; a 0-dim tensor.

    No ``T^2`` factor (that rescales a loss's gradient; this is a metric). Computed in at least float32.
    """
    dtype = torch.promote_types(zt.dtype, torch.float32)
    logpt = torch.log_softmax(zt.to(dtype) / temperature, dim=1)
    logps = torch.log_softmax(zs.to(dtype) / temperature, dim=1)
    return (logpt.exp() * (logpt - logps)).sum(dim=1).mean()


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): ``argmin_T mean_i -log softmax(z_i / T)_{y_i}`` over ``T > 0``, for
    held-out logits ``[N, K]`` and labels ``[N]``.

    Optimises ``log T`` (so T stays positive) from T = 1 with LBFGS and a strong-Wolfe line search, in float64
    (on the CPU for MPS). A set classified perfectly with margins has no minimiser (the NLL falls as T -> 0), so
    the result is then only as small as ``max_iter`` steps reach.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need logits [N, K] and labels [N] with N > 0, got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    device = torch.device("cpu") if logits.device.type == "mps" else logits.device
    z = logits.detach().to(device, torch.float64)
    y = labels.to(device)
    log_t = torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under no_grad
        opt.step(closure)
    return float(log_t.detach().exp())


def scale(logits: Tensor, temperature: float) -> Tensor:
    """Logits ``[..., K]`` divided by a temperature ``T > 0`` (the argmax is unchanged)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature
