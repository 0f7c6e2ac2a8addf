"""Calibration metrics, teacher agreement and temperature scaling against hand values, torchmetrics and
independent float64 numpy implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from distillistic.core.calibration import (
    CalibrationAccumulator,
    adaptive_ece,
    calibration_report,
    fit_temperature,
    kl_teacher_student,
    reliability,
    scale,
    top1_agreement,
)
from distillistic.core.metrics import MetricAccumulator

# Six samples over K = 3 with dyadic (exactly representable) probabilities and distinct confidences
# 7/16, 1/2, 9/16, 3/4, 13/16, 7/8, none on an edge of the 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1].
PROBS = torch.tensor([[7 / 16, 9 / 32, 9 / 32], [1 / 4, 1 / 2, 1 / 4], [7 / 32, 7 / 32, 9 / 16],
                      [3 / 4, 1 / 8, 1 / 8], [3 / 32, 13 / 16, 3 / 32], [1 / 16, 1 / 16, 7 / 8]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 2, 1, 1, 2])  # hits: 1, 0, 1, 0, 1, 1


def test_hand_computed_values() -> None:
    r = calibration_report(PROBS, LABELS, n_bins=3, probs=True)
    assert r["n"] == 6
    # bin 2 of 3: hits 2, confidences 7/16 + 8/16 + 9/16 = 1.5; bin 3: hits 2, confidences 39/16
    assert r["ece"] == pytest.approx((0.5 + 0.4375) / 6, abs=1e-12)  # 5/32
    # |2/3 - 1/2| = 1/6 against |2/3 - 13/16| = 7/48
    assert r["mce"] == pytest.approx(1 / 6, abs=1e-12)
    # equal mass, 2 samples each: |1 - 15/16| + |1 - 21/16| + |2 - 27/16|
    assert r["ace"] == pytest.approx((0.0625 + 0.3125 + 0.3125) / 6, abs=1e-12)  # 11/96
    # per class, sum over bins of |hits - sum p_k|: class 0: 0.375 + 0.5625 + 0.75; class 1: 0.3125 + 0.5 + 0.1875;
    # class 2: 0.75 + 0.4375 + 0.125
    assert r["classwise_ece"] == pytest.approx((1.6875 + 1.0 + 1.3125) / (3 * 6), abs=1e-12)  # 2/9
    # from logits log p the same, up to float32 softmax rounding
    r_logits = calibration_report(PROBS.log(), LABELS, n_bins=3)
    for key in ("ece", "mce", "ace", "classwise_ece"):
        assert r_logits[key] == pytest.approx(r[key], abs=1e-6)


def test_ace_gives_the_extra_samples_to_the_first_groups() -> None:
    # 6 samples in 5 groups: sizes 2, 1, 1, 1, 1 -> |1 - 15/16| + 7/16 + 3/4 + 3/16 + 1/8
    conf, pred = PROBS.max(dim=1)
    hits = (pred == LABELS).double()
    assert adaptive_ece(conf, hits, 5) == pytest.approx(1.5625 / 6, abs=1e-12)
    # N < M: one sample per group, the rest empty: mean |hit - conf|
    assert adaptive_ece(conf, hits, 10) == pytest.approx(float((hits - conf).abs().mean()), abs=1e-12)


def test_reliability_diagram_data() -> None:
    rel = reliability(PROBS, LABELS, n_bins=3, probs=True)
    assert rel["count"] == [0, 3, 3]
    assert rel["accuracy"] == pytest.approx([0.0, 2 / 3, 2 / 3])
    assert rel["confidence"] == pytest.approx([0.0, 0.5, 0.8125])
    assert rel["edges"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_a_confidence_on_an_edge_goes_to_the_lower_bin() -> None:
    # bins (0, 1/2], (1/2, 1] (Naeini/Guo, metrics.py); torchmetrics' [lo, hi) would put 0.5 in the upper bin
    rel = reliability(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 0]), n_bins=2, probs=True)
    assert rel["count"] == [1, 1]
    assert rel["confidence"] == [0.5, 0.75]


def _random_logits(n: int, k: int, seed: int, n_bins: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax values all lie >= 1e-4 away from the bin edges m / n_bins (where the (lo, hi] and
    torchmetrics' [lo, hi) conventions differ), with labels that agree with the argmax about half the time."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3 * n, k, generator=g, dtype=torch.float64) * 2.0
    p = torch.softmax(z.float(), dim=1).double() * n_bins
    keep = ((p - p.round()).abs() > 1e-4).all(dim=1).nonzero().squeeze(1)[:n]
    z = z[keep]
    labels = torch.where(torch.rand(n, generator=g) < 0.5, z.argmax(dim=1), torch.randint(0, k, (n,), generator=g))
    return z, labels


@pytest.mark.parametrize(("n", "k"), [(2000, 10), (500, 3)])
def test_ece_and_mce_match_torchmetrics(n: int, k: int) -> None:
    z, y = _random_logits(n, k, seed=n + k)
    assert len(z) == n
    r = calibration_report(z, y)
    p = torch.softmax(z.float(), dim=1)
    assert r["ece"] == pytest.approx(float(multiclass_calibration_error(p, y, k, 15, norm="l1")), abs=1e-5)
    assert r["mce"] == pytest.approx(float(multiclass_calibration_error(p, y, k, 15, norm="max")), abs=1e-5)
    assert r["ece"] > 0.01  # not a vacuous comparison of zeros


def test_classwise_ece_matches_torchmetrics_per_class() -> None:
    # torchmetrics' binary calibration error bins p_k with "accuracy" = target: one class of the classwise ECE
    z, y = _random_logits(1500, 7, seed=3)
    p = torch.softmax(z.float(), dim=1)
    per_class = [float(binary_calibration_error(p[:, c].contiguous(), (y == c).long(), n_bins=15, norm="l1"))
                 for c in range(7)]
    assert calibration_report(z, y)["classwise_ece"] == pytest.approx(sum(per_class) / 7, abs=1e-5)


def _numpy_ace(conf: np.ndarray, hits: np.ndarray, n_bins: int) -> float:
    order = np.argsort(conf, kind="stable")
    groups = np.array_split(np.arange(len(conf)), n_bins)  # sizes differ by one, larger first
    total = 0.0
    for g in groups:
        if len(g):
            idx = order[g]
            total += len(g) * abs(hits[idx].mean() - conf[idx].mean())
    return total / len(conf)


@pytest.mark.parametrize(("n", "n_bins"), [(1003, 15), (2000, 10), (9, 15)])
def test_ace_matches_an_independent_numpy_implementation(n: int, n_bins: int) -> None:
    z, y = _random_logits(n, 10, seed=n)
    p = torch.softmax(z.float(), dim=1).double().numpy()
    conf, hits = p.max(axis=1), (p.argmax(axis=1) == y.numpy()).astype(np.float64)
    assert calibration_report(z, y, n_bins=n_bins)["ace"] == pytest.approx(_numpy_ace(conf, hits, n_bins), abs=1e-9)


def test_ece_agrees_with_metric_accumulator() -> None:
    z, y = _random_logits(800, 5, seed=11)
    m = MetricAccumulator(5)
    m.update(z, y)
    # the same bins; the values differ only by softmax against exp(log_softmax) rounding in float32
    assert calibration_report(z, y)["ece"] == pytest.approx(m.compute()["ece"], abs=1e-7)


def test_accumulator_batches_and_merged_processes_equal_one_pass() -> None:
    z, y = _random_logits(600, 6, seed=5)
    whole = calibration_report(z, y)
    ranks = [CalibrationAccumulator(6), CalibrationAccumulator(6)]
    for i, (zb, yb) in enumerate(zip(z.split(64), y.split(64))):
        ranks[i % 2].update(zb, yb)  # two "processes" see alternate batches
    # what all_reduce(SUM) and all_gather do across processes
    reduced = [a + b for a, b in zip(ranks[0].tensors(), ranks[1].tensors())]
    gathered = torch.cat([ranks[0].samples(), ranks[1].samples()])
    for acc in ranks:
        acc.load_tensors(reduced)
        acc.load_samples(gathered)
        for key in ("ece", "mce", "ace", "classwise_ece", "n"):
            assert acc.compute()[key] == pytest.approx(whole[key], abs=1e-12)
        assert acc.compute() == pytest.approx(whole, abs=1e-12)


def test_empty_accumulator_gives_nan() -> None:
    r = CalibrationAccumulator(4).compute()
    assert r["n"] == 0
    assert all(math.isnan(r[key]) for key in ("ece", "mce", "ace", "classwise_ece"))


def _numpy_nll(z: np.ndarray, y: np.ndarray) -> float:
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def _tempered_set(t0: float, n: int = 20000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(true logits), presented as true logits * t0: the best temperature is t0."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0
    labels = torch.multinomial(torch.softmax(true, dim=1), 1, generator=g).squeeze(1)
    return true * t0, labels


@pytest.mark.parametrize("t0", [2.5, 0.5])
def test_temperature_scaling_recovers_a_known_temperature(t0: float) -> None:
    z, y = _tempered_set(t0)
    t = fit_temperature(z.float(), y)
    assert t == pytest.approx(t0, rel=0.02)  # the estimate's spread at N = 20000 is about 0.5%
    # and it is the minimiser of an independently computed NLL
    zn, yn = z.numpy(), y.numpy()
    best = _numpy_nll(zn / t, yn)
    assert best <= _numpy_nll(zn / (t * 1.01), yn)
    assert best <= _numpy_nll(zn / (t / 1.01), yn)


def test_fitting_lowers_the_nll_of_an_over_confident_set() -> None:
    z, y = _tempered_set(3.0, n=4000, seed=1)
    with torch.no_grad():  # as in an evaluation loop
        t = fit_temperature(z, y)
    assert t > 1.5
    before, after = _numpy_nll(z.numpy(), y.numpy()), _numpy_nll(scale(z, t).numpy(), y.numpy())
    assert after < before - 0.05
    assert calibration_report(scale(z, t), y)["ece"] < calibration_report(z, y)["ece"]


def test_scale_keeps_the_argmax_and_rejects_bad_temperatures() -> None:
    z, _ = _random_logits(50, 4, seed=2)
    assert torch.equal(scale(z, 2.0).argmax(dim=1), z.argmax(dim=1))
    torch.testing.assert_close(scale(z, 4.0), z * 0.25)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            scale(z, bad)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(z[:0], torch.zeros(0, dtype=torch.long))


def _numpy_kl(zt: np.ndarray, zs: np.ndarray, t: float) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / t
        m = z.max(axis=1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))

    lt, ls = log_softmax(zt), log_softmax(zs)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=1)))


def test_agreement_and_kl_of_identical_models() -> None:
    z, _ = _random_logits(200, 10, seed=7)
    assert float(top1_agreement(z, z.clone())) == 1.0
    assert float(kl_teacher_student(z, z.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(kl_teacher_student(z.float(), z.float(), temperature=4.0)) == pytest.approx(0.0, abs=1e-6)


def test_agreement_by_hand() -> None:
    zs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    zt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 4.0, 0.0]])
    assert float(top1_agreement(zs, zt)) == 0.5  # rows 0 and 2 agree


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_matches_an_independent_float64_formula(temperature: float) -> None:
    g = torch.Generator().manual_seed(9)
    zt, zs = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    expected = _numpy_kl(zt.double().numpy(), zs.double().numpy(), temperature)
    assert expected > 0.01
    assert float(kl_teacher_student(zt, zs, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_teacher_student(zt.double(), zs.double(), temperature)) == pytest.approx(expected, rel=1e-12)
    # KL is not symmetric: the argument order matters
    assert float(kl_teacher_student(zs.double(), zt.double(), temperature)) != pytest.approx(expected, rel=1e-3)
