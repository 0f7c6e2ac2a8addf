"""NKD, TTM, WTTM, MLKD and DOT against float64 transcriptions of their authors' code, kept here.

Each transcription follows the reference line by line (same operations, same order), in float64 torch; the
project's loss runs on the same float64 inputs and must agree in value and in gradient to 1e-10, on random
logits and on extreme ones (scale 100, and a row whose target logit is 700 above the rest).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from distillistic.methods.mlkd import mlkd_loss
from distillistic.methods.nkd import nkd_loss
from distillistic.methods.ttm import power_transform, ttm_loss

pytestmark = pytest.mark.unit

TOL = 1e-10


def _case(kind: str, seed: int, b: int = 7, k: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits, teacher logits (float64) and labels: ``random`` (scale 3), ``large`` (scale 100) or
    ``peaked`` (scale 3 plus 700 on one class of each row: the student's on the label, the teacher's elsewhere
    for half the rows)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=g, dtype=torch.float64)
    t = torch.randn(b, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=g)
    if kind == "random":
        return z * 3, t * 3, y
    if kind == "large":
        return z * 100, t * 100, y
    z, t = z * 3, t * 3
    rows = torch.arange(b)
    z[rows, y] += 700.0
    t[rows, torch.where(rows % 2 == 0, y, (y + 1) % k)] += 700.0
    return z, t, y


KINDS = ["random", "large", "peaked"]


def _agree(ours: Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor], z: Tensor) -> None:
    """Value and gradient (with respect to the student's logits) of the two losses, to ``TOL``."""
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    mine, theirs = ours(z1), reference(z2)
    assert mine.dtype == torch.float64
    assert torch.isfinite(theirs), "the case must be finite in the reference"
    assert mine.item() == pytest.approx(theirs.item(), abs=TOL, rel=TOL)
    (g1,), (g2,) = torch.autograd.grad(mine, z1), torch.autograd.grad(theirs, z2)
    assert torch.allclose(g1, g2, atol=TOL, rtol=TOL), (g1 - g2).abs().max()


# --- NKD: yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py, commit 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 --------


def ref_nkd(logit_s: Tensor, logit_t: Tensor, gt_label: Tensor, temp: float, gamma: float) -> Tensor:
    """``NKDLoss.forward`` (lines 23-51), hard labels."""
    label = gt_label.view(len(gt_label), 1)
    n, _c = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(n, -1)
    logit_t = logit_t[mask].reshape(n, -1)
    S_i = F.log_softmax(logit_s / temp, dim=1)
    T_i = F.softmax(logit_t / temp, dim=1)
    loss_non = (T_i * S_i).sum(dim=1).mean()
    loss_non = -gamma * (temp**2) * loss_non
    return loss_t + loss_non


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("temp", "gamma"), [(3.0, 3.5), (1.0, 1.5), (4.0, 0.7)])
def test_nkd_matches_the_reference(kind: str, temp: float, gamma: float) -> None:
    z, t, y = _case(kind, 1)
    _agree(lambda s: nkd_loss(s, t, y, gamma, temp)["loss"], lambda s: ref_nkd(s, t, y, temp, gamma), z)


def test_nkd_parts_and_teacher_gradient() -> None:
    z, t, y = _case("random", 2)
    t = t.clone().requires_grad_(True)
    out = nkd_loss(z.requires_grad_(True), t, y, 2.0, 3.0)
    assert float(out["loss"]) == pytest.approx(float(out["target"] + 2.0 * 9.0 * out["non_target"]), abs=TOL)
    out["loss"].backward()
    assert t.grad is None  # the teacher is detached


def test_nkd_non_target_part_is_a_kl_plus_the_teacher_entropy() -> None:
    # The normalised non-target term is CE(q̂_t, p̂_s) = KL(q̂_t ‖ p̂_s) + H(q̂_t): zero KL when z = t.
    _, t, y = _case("random", 3)
    out = nkd_loss(t, t, y, 1.0, 2.0)
    keep = torch.ones_like(t, dtype=torch.bool).scatter_(1, y.view(-1, 1), False)
    q = F.softmax(t[keep].view(len(y), -1) / 2.0, dim=1)
    entropy = -(q * q.log()).sum(dim=1).mean()
    assert float(out["non_target"]) == pytest.approx(float(entropy), abs=TOL)


# --- TTM and WTTM: zkxufo/TTM, distiller_zoo/ttm.py and wttm.py, commit fe457b33a71ba27536ec04fe3d32c5b04963522f


def ref_ttm(y_s: Tensor, y_t: Tensor, l: float, weighted: bool) -> Tensor:  # noqa: E741 (the reference's name)
    """``TTM.forward`` (ttm.py lines 13-21) and ``WTTM.forward`` (wttm.py lines 13-21: ``mean(norm * KL)``)."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
    return torch.mean(norm * KL) if weighted else torch.mean(KL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_ttm_and_wttm_match_the_reference(kind: str, gamma: float, weighted: bool) -> None:
    z, t, _ = _case(kind, 4)
    _agree(lambda s: ttm_loss(s, t, gamma, weighted), lambda s: ref_ttm(s, t, gamma, weighted), z)


def test_ttm_is_kd_with_the_temperature_on_the_teacher_only() -> None:
    # softmax(t)^γ / Σ softmax(t)^γ = softmax(γ·t); at γ = 1 TTM is KD at T = 1 (KL(softmax(t) ‖ softmax(z))).
    z, t, _ = _case("random", 5)
    log_q, u = power_transform(t, 0.25)
    assert torch.allclose(log_q, F.log_softmax(0.25 * t, dim=1), atol=TOL, rtol=0)
    assert torch.allclose(u, torch.softmax(t, dim=1).pow(0.25).sum(dim=1), atol=TOL, rtol=TOL)
    kd = F.kl_div(F.log_softmax(z, dim=1), F.softmax(t, dim=1), reduction="batchmean")
    assert ttm_loss(z, t, 1.0).item() == pytest.approx(kd.item(), abs=TOL)
    assert ttm_loss(z, t, 1.0, weighted=True).item() == pytest.approx(kd.item(), abs=TOL)  # U_1 = 1


def test_ttm_teacher_far_beyond_float64_softmax_stays_finite() -> None:
    # A gap of 2000 underflows softmax(t) to exactly 0 (the reference's 0^γ = 0); the log-space transform keeps
    # exp(−γ·2000) > 0 at γ = 0.1 and agrees with softmax(γ·t).
    t = torch.tensor([[2000.0, 0.0, -5.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = ttm_loss(z, t, 0.1, weighted=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert z.grad is not None
    assert bool(torch.isfinite(z.grad).all())
    q = F.softmax(0.1 * t, dim=1)
    u = float(torch.exp(torch.logsumexp(0.1 * F.log_softmax(t, dim=1), dim=1)))
    expected = u * float((q * (q.log() - F.log_softmax(z.detach(), dim=1))).sum())
    assert loss.item() == pytest.approx(expected, rel=TOL)


# --- MLKD: Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py, ---------------------------
# commit 5ee473fcf193dfb00a0598b64d0acfe6ad58a482 (forward_train after the four forwards; the model calls omitted)


def ref_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """``kd_loss`` (lines 13-21), reduce=True."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def ref_cc_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """``cc_loss`` (lines 24-34), reduce=True."""
    _, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def ref_bc_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """``bc_loss`` (lines 37-47), reduce=True."""
    batch_size, _ = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def ref_mlkd(s_w: Tensor, s_s: Tensor, t_w: Tensor, t_s: Tensor, target: Tensor, temperature: float,
             ce_w: float, kd_w: float) -> Tensor:
    """``KD_ours.forward_train`` lines 96-255: the sum of its ``losses_dict`` (what the trainer backpropagates)."""
    pred_teacher_weak = F.softmax(t_w.detach(), dim=1)
    confidence, _ = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.detach().cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0).detach()
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    loss_ce = ce_w * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target))
    taus = (temperature, 3.0, 5.0, 2.0, 6.0)
    loss_kd_weak = sum(kd_w * ((ref_kd_loss(s_w, t_w, tau) * mask).mean()) for tau in taus)
    loss_kd_strong = (kd_w * ref_kd_loss(s_s, t_s, temperature) + kd_w * ref_kd_loss(s_s, t_s, 3.0)
                      + kd_w * ref_kd_loss(s_s, t_s, 5.0) + kd_w * ref_kd_loss(s_w, t_w, 2.0)
                      + kd_w * ref_kd_loss(s_w, t_w, 6.0))
    loss_cc_weak = sum(kd_w * ((ref_cc_loss(s_w, t_w, tau) * class_conf_mask).mean()) for tau in taus)
    loss_bc_weak = sum(kd_w * ((ref_bc_loss(s_w, t_w, tau) * mask).mean()) for tau in taus)
    return loss_ce + (loss_kd_weak + loss_kd_strong) + loss_cc_weak + loss_bc_weak


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("temp", "ce_w", "kd_w", "b"), [(4.0, 0.1, 0.9, 8), (1.0, 0.5, 0.5, 7), (4.0, 1.0, 2.0, 5)])
@pytest.mark.parametrize("strong", [False, True])  # the gradient with respect to either view's student logits
def test_mlkd_matches_the_reference(kind: str, temp: float, ce_w: float, kd_w: float, b: int, strong: bool) -> None:
    z_w, t_w, y = _case(kind, 6, b=b)
    z_s, t_s, _ = _case(kind, 7, b=b)

    def ours(s: Tensor) -> Tensor:
        return mlkd_loss(z_w if strong else s, s if strong else z_s, t_w, t_s, y, temp, ce_w, kd_w)["loss"]

    def theirs(s: Tensor) -> Tensor:
        return ref_mlkd(z_w if strong else s, s if strong else z_s, t_w, t_s, y, temp, ce_w, kd_w)

    _agree(ours, theirs, z_s if strong else z_w)


def test_mlkd_term_leaves_the_weak_cross_entropy_to_the_objective() -> None:
    z_w, t_w, y = _case("random", 8)
    z_s, t_s, _ = _case("random", 9)
    out = mlkd_loss(z_w, z_s, t_w, t_s, y)
    assert (out["loss"] - out["term"]).item() == pytest.approx(0.1 * F.cross_entropy(z_w, y).item(), abs=TOL)
    assert out["loss"].item() == pytest.approx(
        (0.1 * (F.cross_entropy(z_w, y) + F.cross_entropy(z_s, y)) + out["kd"] + out["cc"] + out["bc"]).item(),
        abs=TOL)
