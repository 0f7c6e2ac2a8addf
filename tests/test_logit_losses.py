"""Golden tests of the logit-based methods (DESIGN.md, section 8) against float64 implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillistic.core.ema import ema_update_, mean_teacher_decay
from distillistic.core.logits import standardize
from distillistic.methods.ctkd import LearnableTemperature, cosine_lambda, kd_loss, reverse_grad
from distillistic.methods.dist import dist_loss
from distillistic.methods.dkd import dkd_loss, linear_warmup
from distillistic.methods.kdcl import kdcl_min_logit_target
from distillistic.methods.ls import label_smoothing_cross_entropy
from distillistic.methods.pcl import peer_mean_target, sigmoid_rampup


def standardized_kd_loss(z: torch.Tensor, t: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KD on z-scored logits (the logit-standardisation authors' loss, base temperature 2)."""
    return kd_loss(standardize(z), standardize(t.detach()), temperature)

# --- independent float64 references --------------------------------------------------------------------------


def np_log_softmax(row: np.ndarray) -> np.ndarray:
    m = float(np.max(row))
    return row - m - math.log(float(np.sum(np.exp(row - m))))


def np_kl(log_q: np.ndarray, log_p: np.ndarray) -> float:
    """KL(q ‖ p) of one sample from log-probabilities."""
    q = np.exp(log_q)
    return float(sum(qc * (lq - lp) for qc, lq, lp in zip(q, log_q, log_p) if qc > 0))


def np_kd(z: np.ndarray, t: np.ndarray, temp: float) -> float:
    per_sample = [np_kl(np_log_softmax(tb / temp), np_log_softmax(zb / temp)) for zb, tb in zip(z, t)]
    return temp**2 * float(np.mean(per_sample))


def np_pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def np_dkd(z: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float) -> tuple[float, float]:
    """(TCKD, NCKD) by their definitions, in log space so that 1 − p_y never underflows."""
    tckd, nckd = [], []
    for zb, tb, yb in zip(z, t, y):
        parts = []
        for logits in (zb / temp, tb / temp):
            others = np.delete(logits, yb)
            lse_all = float(np.max(logits)) + math.log(float(np.sum(np.exp(logits - np.max(logits)))))
            lse_others = float(np.max(others)) + math.log(float(np.sum(np.exp(others - np.max(others)))))
            binary = np.array([logits[yb] - lse_all, lse_others - lse_all])
            parts.append((binary, others - lse_others))
        (bs, ns), (bt, nt) = parts
        tckd.append(np_kl(bt, bs))
        nckd.append(np_kl(nt, ns))
    return float(np.mean(tckd)), float(np.mean(nckd))


def _logits(seed: int, b: int = 6, k: int = 5, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * scale


def _labels(seed: int, b: int = 6, k: int = 5) -> torch.Tensor:
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))


# --- label smoothing -----------------------------------------------------------------------------------------


def test_label_smoothing_eps_zero_is_cross_entropy() -> None:
    z, y = _logits(0), _labels(1)
    assert torch.equal(label_smoothing_cross_entropy(z, y, 0.0), F.cross_entropy(z, y))  # bitwise


@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_label_smoothing_cross_entropy_golden(eps: float) -> None:
    z, y = _logits(2), _labels(3)
    zz, k = z.double().numpy(), z.shape[1]
    golden = 0.0
    for zb, yb in zip(zz, y.tolist()):
        logp = np_log_softmax(zb)
        golden -= sum(((1 - eps) * (c == yb) + eps / k) * logp[c] for c in range(k))
    golden /= len(zz)
    assert float(label_smoothing_cross_entropy(z, y, eps)) == pytest.approx(golden, rel=1e-6)
    with pytest.raises(ValueError, match="eps"):
        label_smoothing_cross_entropy(z, y, 1.5)


# --- DKD -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("temp", "alpha", "beta"), [(1.0, 1.0, 1.0), (4.0, 1.0, 8.0), (2.0, 0.5, 3.0)])
def test_dkd_golden(temp: float, alpha: float, beta: float) -> None:
    z, t, y = _logits(4), _logits(5), _labels(6)
    out = dkd_loss(z, t, y, alpha, beta, temp)
    tckd, nckd = np_dkd(z.double().numpy(), t.double().numpy(), y.numpy(), temp)
    assert float(out["tckd"]) == pytest.approx(tckd, rel=1e-5)
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(temp**2 * (alpha * tckd + beta * nckd), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_decomposes_kl(temp: float) -> None:
    # Zhao et al. eq. (5): KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD, per sample; here with B = 1 for each sample.
    z, t, y = _logits(7), _logits(8), _labels(9)
    for b in range(len(y)):
        zb, tb, yb = z[b : b + 1], t[b : b + 1], y[b : b + 1]
        out = dkd_loss(zb, tb, yb, 1.0, 1.0, temp)
        log_pt = np_log_softmax(tb[0].double().numpy() / temp)
        kl_full = np_kl(log_pt, np_log_softmax(zb[0].double().numpy() / temp))
        p_ty = math.exp(log_pt[int(yb)])
        assert float(out["tckd"]) + (1 - p_ty) * float(out["nckd"]) == pytest.approx(kl_full, rel=1e-5, abs=1e-7)
        # and Hinton KD is the same KL times T²
        assert float(kd_loss(zb, tb, temp)) == pytest.approx(temp**2 * kl_full, rel=1e-5, abs=1e-7)


def test_dkd_target_does_not_leak_into_nckd_at_large_scale() -> None:
    # The reference subtracts 1000 from z_y / T; with a target logit 2000 above the others that leaves the target
    # dominating the "non-target" softmax. Gathering the non-target classes is exact at any scale.
    z = torch.tensor([[2000.0, 0.0, 1.0, -1.0], [0.0, 30.0, -2.0, 1.0]])
    t = torch.tensor([[1500.0, 2.0, 0.0, 0.5], [1.0, 25.0, 0.0, -1.0]])
    y = torch.tensor([0, 1])
    out = dkd_loss(z, t, y, 1.0, 1.0, 1.0)
    tckd, nckd = np_dkd(z.double().numpy(), t.double().numpy(), y.numpy(), 1.0)
    assert all(math.isfinite(float(v)) for v in out.values())
    assert float(out["nckd"]) == pytest.approx(nckd, rel=1e-5)
    assert float(out["tckd"]) == pytest.approx(tckd, rel=1e-4, abs=1e-9)  # 1 − p_y ≈ e^-30: no log(0)
    z.requires_grad_(True)
    dkd_loss(z, t, y, 1.0, 8.0, 4.0)["loss"].backward()
    assert z.grad is not None
    assert bool(torch.isfinite(z.grad).all())


def test_dkd_gradient_reaches_only_the_student() -> None:
    z, t, y = _logits(10).requires_grad_(True), _logits(11).requires_grad_(True), _labels(12)
    dkd_loss(z, t, y)["loss"].backward()
    assert z.grad is not None
    assert float(z.grad.abs().sum()) > 0
    assert t.grad is None


def test_linear_warmup() -> None:
    assert linear_warmup(0, 20) == 0.0
    assert linear_warmup(1, 20) == pytest.approx(0.05)
    assert linear_warmup(10, 20) == pytest.approx(0.5)
    assert linear_warmup(20, 20) == 1.0
    assert linear_warmup(35, 20) == 1.0
    assert linear_warmup(3, 0) == 1.0


# --- DIST ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (1.0, 3.0, 2.0)])
def test_dist_golden(beta: float, gamma: float, tau: float) -> None:
    z, t = _logits(13, b=7, k=6), _logits(14, b=7, k=6)
    ys = np.array([np.exp(np_log_softmax(r / tau)) for r in z.double().numpy()])
    yt = np.array([np.exp(np_log_softmax(r / tau)) for r in t.double().numpy()])
    inter = 1 - np.mean([np_pearson(ys[b], yt[b]) for b in range(7)])
    intra = 1 - np.mean([np_pearson(ys[:, k], yt[:, k]) for k in range(6)])
    out = dist_loss(z, t, beta, gamma, tau)
    assert float(out["inter"]) == pytest.approx(inter, rel=1e-5, abs=1e-6)
    assert float(out["intra"]) == pytest.approx(intra, rel=1e-5, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(tau**2 * (beta * inter + gamma * intra), rel=1e-5, abs=1e-6)


def test_dist_zero_for_the_teacher_up_to_a_per_sample_shift() -> None:
    t = _logits(15)
    shift = torch.arange(6, dtype=torch.float32).view(-1, 1) * 3.0 - 7.0  # softmax ignores it
    out = dist_loss(t + shift, t, 2.0, 2.0, 4.0)
    assert float(out["loss"]) == pytest.approx(0.0, abs=1e-5)
    # a scaled teacher is NOT a zero: Pearson is invariant to affine maps of the probabilities, not the logits
    assert float(dist_loss(2.0 * t, t)["inter"]) > 1e-3


def test_dist_two_by_two_is_the_sign_of_the_correlation() -> None:
    # Two points (B = 2 or K = 2) are always perfectly correlated or anti-correlated: Pearson = ±1. With
    # z = a·t (a > 0) the order of the probabilities is kept, so both terms vanish; with z = −a·t both are 2.
    t = torch.tensor([[1.0, -0.5], [-2.0, 0.3]])
    for a in (0.3, 3.0):
        same = dist_loss(a * t, t)
        assert float(same["inter"]) == pytest.approx(0.0, abs=1e-6)
        assert float(same["intra"]) == pytest.approx(0.0, abs=1e-6)
        flipped = dist_loss(-a * t, t, beta=1.0, gamma=1.0, tau=2.0)
        assert float(flipped["inter"]) == pytest.approx(2.0, abs=1e-6)
        assert float(flipped["intra"]) == pytest.approx(2.0, abs=1e-6)
        assert float(flipped["loss"]) == pytest.approx(4.0 * (2.0 + 2.0), abs=1e-5)


def test_dist_scales_with_tau_squared() -> None:
    # y = softmax(z / τ) is unchanged by (z, t, τ) → (a z, a t, a τ), so the loss scales by a².
    z, t = _logits(16), _logits(17)
    scaled = float(dist_loss(3 * z, 3 * t, tau=3.0)["loss"])
    assert scaled == pytest.approx(9 * float(dist_loss(z, t)["loss"]), rel=1e-5)


# --- logit standardisation -----------------------------------------------------------------------------------


def test_standardize_by_hand_uses_the_unbiased_std() -> None:
    # z = [0, 2]: mean 1, unbiased std √2 (the biased one would be 1 and give [-1, 1]).
    out = standardize(torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2)]]))


def test_standardize_golden_mean_zero_std_one_and_affine_invariance() -> None:
    z = _logits(18, b=5, k=10)
    out = standardize(z)
    zz = z.double().numpy()
    golden = (zz - zz.mean(1, keepdims=True)) / (1e-7 + zz.std(1, ddof=1, keepdims=True))
    np.testing.assert_allclose(out.double().numpy(), golden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.double().numpy().mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.double().numpy().std(1, ddof=1), 1.0, atol=1e-5)
    torch.testing.assert_close(standardize(4.0 * z - 3.0), out, rtol=1e-5, atol=1e-5)


def test_standardized_kd_golden() -> None:
    z, t = _logits(19), _logits(20, scale=10.0)
    zz, tt = z.double().numpy(), t.double().numpy()

    def zscore(a: np.ndarray) -> np.ndarray:
        return (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))

    golden = np_kd(zscore(zz), zscore(tt), 2.0)
    assert float(standardized_kd_loss(z, t)) == pytest.approx(golden, rel=1e-5)  # base temperature 2 by default
    # the teacher's scale no longer matters
    assert float(standardized_kd_loss(z, 5.0 * t)) == pytest.approx(golden, rel=1e-5)


# --- CTKD ----------------------------------------------------------------------------------------------------


def test_reverse_grad_is_identity_forward_and_minus_lambda_backward() -> None:
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    out = reverse_grad(x, 0.5)
    assert torch.equal(out, x.detach())
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_learnable_temperature_init_and_reversed_kd_gradient() -> None:
    module = LearnableTemperature()
    sig = 1 / (1 + math.exp(-1.0))
    assert module.theta.shape == torch.Size([])
    temp = module(0.7)
    assert temp.shape == torch.Size([])
    assert temp.dtype == torch.float32
    assert float(temp.detach()) == pytest.approx(1 + 20 * sig, rel=1e-6)  # CTKD's initial T ≈ 15.62

    z, t = _logits(21), _logits(22)
    lam = 0.7
    kd_loss(z, t, module(lam)).backward()
    reversed_grad = float(module.theta.grad)  # type: ignore[arg-type]
    # the plain gradient, by central differences of the float64 KD loss in θ
    h = 1e-5

    def loss_at(theta: float) -> float:
        return np_kd(z.double().numpy(), t.double().numpy(), 1 + 20 / (1 + math.exp(-theta)))

    plain = (loss_at(1.0 + h) - loss_at(1.0 - h)) / (2 * h)
    assert abs(plain) > 1e-4
    assert reversed_grad == pytest.approx(-lam * plain, rel=1e-3)
    assert math.copysign(1, reversed_grad) == -math.copysign(1, plain)


def test_cosine_lambda_ramp() -> None:
    assert cosine_lambda(0.0, 1.0, 0.0, 0.2) == pytest.approx(0.0)
    assert cosine_lambda(0.1, 1.0, 0.0, 0.2) == pytest.approx(0.5)
    assert cosine_lambda(0.05, 1.0, 0.0, 0.2) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert cosine_lambda(0.2, 1.0, 0.0, 0.2) == pytest.approx(1.0)
    assert cosine_lambda(0.9, 1.0, 0.0, 0.2) == pytest.approx(1.0)
    assert cosine_lambda(0.1, 3.0, 1.0, 0.2) == pytest.approx(2.0)
    # the reference: CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(1) = (cos(π/10) + 1)/2 − 1
    assert cosine_lambda(1 / 240) == pytest.approx(-((math.cos(math.pi / 10) + 1) / 2 - 1))


# --- KDCL-MinLogit -------------------------------------------------------------------------------------------


def test_kdcl_min_logit_by_hand() -> None:
    z1 = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 4.0]])
    z2 = torch.tensor([[2.0, 2.0, -1.0], [1.0, 3.0, 2.0]])
    y = torch.tensor([0, 1])
    # sample 0 (y = 0): z̃1 = [0, −2, −3], z̃2 = [0, 0, −3] → min [0, −2, −3]
    # sample 1 (y = 1): z̃1 = [−1, 0, 3], z̃2 = [−2, 0, −1] → min [−2, 0, −1]
    mins = np.array([[0.0, -2.0, -3.0], [-2.0, 0.0, -1.0]])
    for temp in (1.0, 2.0):
        golden = np.exp(mins / temp) / np.exp(mins / temp).sum(1, keepdims=True)
        out = kdcl_min_logit_target([z1, z2], y, temp)
        np.testing.assert_allclose(out.double().numpy(), golden, rtol=1e-6)
        torch.testing.assert_close(kdcl_min_logit_target(torch.stack([z1, z2]), y, temp), out)


def test_kdcl_target_is_detached() -> None:
    z = _logits(23).requires_grad_(True)
    assert not kdcl_min_logit_target([z, 2 * z], _labels(24), 3.0).requires_grad


# --- PCL -----------------------------------------------------------------------------------------------------


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 80) == 1.0
    assert sigmoid_rampup(200, 80) == 1.0
    assert sigmoid_rampup(-3, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 0) == 1.0


def test_mean_teacher_decay() -> None:
    assert mean_teacher_decay(0, 0.999) == 0.0
    assert mean_teacher_decay(1, 0.999) == pytest.approx(0.5)
    assert mean_teacher_decay(9, 0.999) == pytest.approx(0.9)
    assert mean_teacher_decay(100_000, 0.999) == 0.999


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        for param in net.parameters():  # BatchNorm's affine parameters start at 1 and 0 in every copy
            param.normal_()
    net.train()
    net(torch.randn(8, 4))  # moves the running statistics away from their initial values
    return net


@pytest.mark.parametrize("copy_buffers", [True, False])
def test_ema_update_one_step(copy_buffers: bool) -> None:
    ema, model = _net(0), _net(1)
    before = {n: p.detach().double().numpy().copy() for n, p in ema.named_parameters()}
    buffers_before = {n: b.clone() for n, b in ema.named_buffers()}
    source = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    d = 0.9
    ema_update_(ema, model, d, copy_buffers=copy_buffers)
    for name, param in ema.named_parameters():
        np.testing.assert_allclose(param.detach().double().numpy(), d * before[name] + (1 - d) * source[name],
                                   rtol=1e-6, atol=1e-7)
        assert not np.allclose(before[name], source[name])  # the update did something
    model_buffers = dict(model.named_buffers())
    for name, buf in ema.named_buffers():
        assert torch.equal(buf, model_buffers[name] if copy_buffers else buffers_before[name])
    for name, param in model.named_parameters():  # the model is untouched
        assert np.array_equal(param.detach().double().numpy(), source[name])


def test_ema_update_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3)), 0.9)


def test_peer_mean_target_golden() -> None:
    logits = torch.stack([_logits(25), _logits(26), _logits(27)])
    temp = 3.0
    probs = [np.array([np.exp(np_log_softmax(r / temp)) for r in m.double().numpy()]) for m in logits]
    out = peer_mean_target(logits.requires_grad_(True), temp)
    assert out.shape == logits.shape
    assert not out.requires_grad
    for i in range(3):
        golden = sum(probs[j] for j in range(3) if j != i) / 2
        np.testing.assert_allclose(out[i].double().numpy(), golden, rtol=1e-6, atol=1e-8)
    # with two members each row is exactly the other member's distribution (no Σ − p_i cancellation)
    two = peer_mean_target(logits[:2].detach(), temp)
    assert torch.equal(two[0], F.softmax(logits[1].detach() / temp, dim=-1))
    assert torch.equal(two[1], F.softmax(logits[0].detach() / temp, dim=-1))


# --- float32 under autocast ----------------------------------------------------------------------------------


def test_outputs_are_float32_under_autocast() -> None:
    z, t, y = _logits(28).bfloat16(), _logits(29).bfloat16(), _labels(30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            kd_loss(z, t, 4.0), label_smoothing_cross_entropy(z, y, 0.1), *dkd_loss(z, t, y).values(),
            *dist_loss(z, t).values(),
            standardize(z), kdcl_min_logit_target([z, t], y, 2.0), peer_mean_target(torch.stack([z, t]), 2.0),
        ]
        reference = dkd_loss(z.float(), t.float(), y)["loss"]
    assert all(o.dtype == torch.float32 for o in outs)
    assert float(outs[4]) == float(reference)  # bf16 inputs are upcast first: the same float32 arithmetic
