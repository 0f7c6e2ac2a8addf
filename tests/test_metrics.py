"""Streaming metrics against hand computations and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from distillistic.core.metrics import MetricAccumulator, pairwise_kl

# Four samples over K = 3 with exactly representable probabilities (logits = log p).
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.125, 0.75, 0.125], [0.125, 0.125, 0.75]],
                     dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0])
LN2, LN43 = math.log(2), math.log(4 / 3)


def test_hand_computed_values() -> None:
    acc = MetricAccumulator(3)
    acc.update(PROBS.log(), LABELS)
    m = acc.compute(reliability=True)
    assert m["n"] == 4
    assert m["top1"] == 0.5  # samples 0 and 2 are right
    assert m["top5"] == 1.0  # top-min(5, K) holds every label
    # NLL: -log p_y = ln 2, 2 ln 2, ln(4/3), 3 ln 2
    assert m["nll"] == pytest.approx((6 * LN2 + LN43) / 4, abs=1e-6)
    # Brier: 0.375, 0.875, 0.09375, 1.34375
    assert m["brier"] == pytest.approx(2.6875 / 4, abs=1e-6)
    # entropy: 1.5 ln 2 twice, 0.75 ln 2 + 0.75 ln(4/3) twice
    assert m["entropy"] == pytest.approx((4.5 * LN2 + 1.5 * LN43) / 4, abs=1e-6)
    # ECE: confidence 0.5 (bin (7/15, 8/15]) with accuracy 1/2: gap 0; confidence 0.75 (bin (11/15, 12/15])
    # with accuracy 1/2: gap 0.25 over half the samples
    assert m["ece"] == pytest.approx(0.125, abs=1e-6)
    rel = m["reliability"]
    assert rel["count"][7] == 2
    assert rel["count"][11] == 2
    assert sum(rel["count"]) == 4
    assert rel["accuracy"][7] == pytest.approx(0.5)
    assert rel["confidence"][11] == pytest.approx(0.75)


def test_top5_with_more_classes() -> None:
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [9.0, 8, 7, 6, 5, 4, 3], [1.0, 2, 3, 4, 5, 6, 7]])
    acc = MetricAccumulator(7)
    acc.update(logits, torch.tensor([4, 5, 2]))  # ranks 5, 6, 5: in, out, in
    m = acc.compute()
    assert m["top1"] == 0.0
    assert m["top5"] == pytest.approx(2 / 3)


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin() -> None:
    # confidence exactly 0.6 = 9/15 belongs to bin (8/15, 9/15] (Naeini/Guo convention)
    acc = MetricAccumulator(2)
    acc.update_probs(torch.tensor([[0.6, 0.4]], dtype=torch.float64), torch.tensor([0]))
    rel = acc.compute(reliability=True)["reliability"]
    assert rel["count"].index(1) in (8, 9)  # float32 rounding of 0.6 * 15 may land either side of 9
    acc = MetricAccumulator(2)
    acc.update_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert acc.compute(reliability=True)["reliability"]["count"][14] == 1  # confidence 1 in the last bin


def _random_batch(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 6  # spread the confidences over every bin
    logits = torch.randn(n, k, generator=g) * scale
    labels = torch.where(torch.rand(n, generator=g) < 0.6, logits.argmax(1), torch.randint(0, k, (n,), generator=g))
    return logits, labels


def _away_from_edges(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf = logits.softmax(1).max(1).values.double() * 15
    keep = (conf - conf.round()).abs() > 1e-3
    return logits[keep], labels[keep]


@pytest.mark.parametrize("k", [3, 10])
def test_against_torchmetrics(k: int) -> None:
    logits, labels = _away_from_edges(*_random_batch(3000, k, seed=k))
    assert len(labels) > 2900
    acc = MetricAccumulator(k)
    acc.update(logits, labels)
    m = acc.compute()
    probs = logits.softmax(1)
    ece = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")(probs, labels)
    assert m["ece"] == pytest.approx(float(ece), abs=1e-5)
    assert m["ece"] > 0.01  # the batch is miscalibrated: the comparison is not between two zeros
    top1 = MulticlassAccuracy(num_classes=k, top_k=1, average="micro")(logits, labels)
    assert m["top1"] == pytest.approx(float(top1), abs=1e-6)
    if k >= 5:
        top5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro")(logits, labels)
        assert m["top5"] == pytest.approx(float(top5), abs=1e-6)
        assert m["top5"] > m["top1"]
    assert m["nll"] == pytest.approx(float(F.cross_entropy(logits.double(), labels)), rel=1e-5)
    onehot = F.one_hot(labels, k).double()
    assert m["brier"] == pytest.approx(float(((probs.double() - onehot) ** 2).sum(1).mean()), rel=1e-5)
    entropy = torch.distributions.Categorical(logits=logits.double()).entropy().mean()
    assert m["entropy"] == pytest.approx(float(entropy), rel=1e-5)


def test_streaming_over_many_batches_equals_one_batch() -> None:
    logits, labels = _random_batch(1000, 10, seed=7)
    whole = MetricAccumulator(10, per_class=True)
    whole.update(logits, labels)
    streamed = MetricAccumulator(10, per_class=True)
    sizes = [1, 2, 3, 50, 7, 300, 137, 500]
    for chunk_logits, chunk_labels in zip(logits.split(sizes), labels.split(sizes)):
        streamed.update(chunk_logits, chunk_labels)
    a, b = whole.compute(reliability=True), streamed.compute(reliability=True)
    for key in ("top1", "top5", "ece", "nll", "brier", "entropy"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9)  # per-batch sums are float32
    assert a["n"] == b["n"] == 1000
    assert a["reliability"]["count"] == b["reliability"]["count"]
    assert a["per_class_top1"] == pytest.approx(b["per_class_top1"])
    # two processes' halves summed as all_reduce sums their tensors equal accumulating both
    first, second = MetricAccumulator(10, per_class=True), MetricAccumulator(10, per_class=True)
    first.update(logits[:400], labels[:400])
    second.update(logits[400:], labels[400:])
    first.load_tensors([x + y for x, y in zip(first.tensors(), second.tensors())])
    assert first.compute()["ece"] == pytest.approx(a["ece"], rel=1e-6)


def test_per_class_accuracy() -> None:
    logits = torch.eye(3)[[0, 1, 1, 2, 2, 2]] * 5  # predictions 0, 1, 1, 2, 2, 2
    acc = MetricAccumulator(4, per_class=True)
    acc.update(torch.cat([logits, torch.zeros(6, 1)], 1), torch.tensor([0, 1, 0, 2, 1, 2]))
    assert acc.compute()["per_class_top1"] == [0.5, 0.5, 1.0, None]


def test_update_probs_matches_update_on_logits() -> None:
    logits, labels = _random_batch(500, 10, seed=3)
    a, b = MetricAccumulator(10), MetricAccumulator(10)
    a.update(logits, labels)
    b.update_probs(logits.softmax(1), labels)
    ma, mb = a.compute(), b.compute()
    for key in ("top1", "top5", "ece", "nll", "brier", "entropy"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-5)


def test_empty_accumulator() -> None:
    m = MetricAccumulator(10).compute()
    assert m["n"] == 0
    for key in ("top1", "top5", "ece", "nll", "brier", "entropy"):
        assert math.isnan(m[key])


def test_update_does_not_sync_or_track_gradients() -> None:
    logits = torch.randn(8, 5, requires_grad=True)
    acc = MetricAccumulator(5)
    acc.update(logits, torch.arange(8) % 5)
    assert not acc.sums.requires_grad
    assert acc.sums.dtype == torch.float64


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pairwise_kl_against_a_double_loop(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    logits = [torch.randn(16, 7, generator=g) * 2 for _ in range(n)]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(n):
            if i != j:  # KL(p_j || p_i), batchmean
                total += float(F.kl_div(F.log_softmax(logits[i], 1), F.log_softmax(logits[j], 1),
                                        reduction="batchmean", log_target=True))
                pairs += 1
    assert float(pairwise_kl(logits)) == pytest.approx(total / pairs, rel=1e-5)
    assert float(pairwise_kl([logits[0]] * n)) == pytest.approx(0.0, abs=1e-6)
