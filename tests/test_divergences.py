"""Golden values of the divergences, their T² factor and the KL gradient (DESIGN.md, section 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

from distillistic.core.divergences import DIVERGENCES, js, kl, mse

# Student logits whose softmax at T is exactly [0.25, 0.75] (z / T = [0, ln 3]); target [0.5, 0.5].
Q = torch.tensor([[0.5, 0.5]])


def _z(t: float) -> torch.Tensor:
    return torch.tensor([[0.0, t * math.log(3)]])


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 20.0])
def test_golden_values_with_the_t_squared_factor(t: float) -> None:
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3)
    assert float(kl(Q, _z(t), t)) == pytest.approx(t**2 * 0.5 * math.log(4 / 3), rel=1e-6)
    # sum_c (p_c - q_c)^2 = 2 * 0.25^2
    assert float(mse(Q, _z(t), t)) == pytest.approx(t**2 * 0.125, rel=1e-6)
    # JS with m = [.375, .625]: (KL(q || m) + KL(p || m)) / 2
    kl_qm = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_pm = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    assert float(js(Q, _z(t), t)) == pytest.approx(t**2 * (kl_qm + kl_pm) / 2, rel=1e-6)


def _batch(seed: int, b: int = 8, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(b, k, generator=g) * 2, dim=1)
    z = torch.randn(b, k, generator=g) * 3
    return q, z


@pytest.mark.parametrize("t", [1.0, 3.0, 20.0])
def test_kl_is_torchs_batchmean_kl_div_times_t_squared(t: float) -> None:
    q, z = _batch(1)
    expected = F.kl_div(F.log_softmax(z / t, dim=1), q, reduction="batchmean") * t**2
    assert float(kl(q, z, t)) == pytest.approx(float(expected), rel=1e-5)
    # by hand, in float64
    p = torch.softmax(z.double() / t, dim=1)
    by_hand = (q.double() * (q.double().log() - p.log())).sum(1).mean() * t**2
    assert float(kl(q, z, t)) == pytest.approx(float(by_hand), rel=1e-5)


@pytest.mark.parametrize("t", [1.0, 5.0])
def test_js_and_mse_against_independent_references(t: float) -> None:
    q, z = _batch(2)
    p = torch.softmax(z.double() / t, dim=1)
    ref_js = sum(jensenshannon(qb.numpy(), pb.numpy()) ** 2 for qb, pb in zip(q.double(), p)) / len(q)
    assert float(js(q, z, t)) == pytest.approx(t**2 * ref_js, rel=1e-5)
    ref_mse = F.mse_loss(p, q.double(), reduction="sum") / len(q)
    assert float(mse(q, z, t)) == pytest.approx(t**2 * float(ref_mse), rel=1e-5)


def test_zero_target_entries_are_fine() -> None:
    q = torch.tensor([[1.0, 0.0, 0.0]])
    z = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(kl(q, z, 1.0)) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))), rel=1e-6)
    assert math.isfinite(float(js(q, z, 1.0)))


@pytest.mark.parametrize("name", ["kl", "js", "mse"])
def test_several_targets_per_sample_are_averaged(name: str) -> None:
    divergence = DIVERGENCES.get(name)
    q1, z = _batch(3)
    q2, _ = _batch(4)
    both = divergence(torch.stack([q1, q2]), z, 2.0)
    assert float(both) == pytest.approx((float(divergence(q1, z, 2.0)) + float(divergence(q2, z, 2.0))) / 2, rel=1e-6)
    assert float(divergence(q1, torch.log(q1) * 2.0, 2.0)) == pytest.approx(0.0, abs=1e-5)  # zero at p = q


@pytest.mark.parametrize("t", [1.0, 4.0, 20.0])
def test_kl_gradient_is_t_over_b_times_p_minus_q(t: float) -> None:
    q, z = _batch(5, b=8)
    z.requires_grad_(True)
    kl(q, z, t).backward()
    assert z.grad is not None
    expected = (t / len(q)) * (torch.softmax(z.detach() / t, dim=1) - q)
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)


def test_targets_never_receive_gradient() -> None:
    q, z = _batch(6)
    q = q.clone().requires_grad_(True)
    z.requires_grad_(True)
    for name in ("kl", "js", "mse"):
        DIVERGENCES.get(name)(q, z, 2.0).backward()
    assert q.grad is None
    assert z.grad is not None


def test_half_precision_logits_are_computed_in_float32() -> None:
    q, z = _batch(7)
    assert kl(q, z.bfloat16(), 2.0).dtype == torch.float32
    assert float(kl(q, z.bfloat16(), 2.0)) == pytest.approx(float(kl(q, z.bfloat16().float(), 2.0)), rel=1e-6)
