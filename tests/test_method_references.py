"""Every method of the first releases against a float64 transcription of its authors' code, kept here.

Each ``ref_*`` function follows its reference line by line (same operations, same order) in float64 torch, and
names the repository, path and commit it was taken from. The method runs through its real objective (the config's
defaults resolved as a run resolves them, a frozen "teacher" answering fixed logits) on the same float64 inputs,
and the whole loss and its gradient with respect to the student's logits (and CTKD's temperature parameter) must
agree to 1e-10, on random logits and on extreme ones (scale 100; a row 700 above the rest). The feature losses are
compared function to function on random float64 features. Where a reference adds a numerical guard that changes
the value (DML's ``1e-8`` inside its log, DKD's ``log`` of summed probabilities and its ``- 1000`` mask), the
transcription keeps the reference's arithmetic and the case is one where the guard does not bite in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.objective import Objective
from distillistic.core.signals import StepInputs, Teacher
from distillistic.data.views import Views
from distillistic.methods.at import at_loss
from distillistic.methods.crd import CRDHead
from distillistic.methods.fitnet import hint_loss
from distillistic.methods.registry import METHODS, Context
from distillistic.methods.rkd import rkd_loss
from distillistic.methods.sp import sp_loss
from distillistic.training import setup

pytestmark = pytest.mark.unit

TOL = 1e-10
B, K = 6, 10
KINDS = ("random", "large", "peaked")

MDISTILLER = "megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259"
LS_KD = "sunshangquan/logit-standardization-KD@f6e5aa5172bad618e801163c3385322eea673754"
CTKD = "zhengli97/CTKD@7d5252241259ae70d38a832371fed9697d15fc14"
TFKD = "yuanli2333/Teacher-free-Knowledge-Distillation@d000ab378a409535a5f5f645b473e05e27529a02"
DIST = "hunto/image_classification_sota@2bc48324cd03c6d85a36ca2b94e9f9878b2ff55f"
DML = "YingZhangDUT/Deep-Mutual-Learning@efd9a085720ed9727ae8792604440097b59ada54"
REPDISTILLER = "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403"


def _case(kind: str, seed: int, students: int = 1) -> tuple[list[Tensor], Tensor, Tensor]:
    """Students' and teacher's float64 logits ``[B, K]`` and labels: ``random`` (scale 3), ``large`` (scale 100),
    ``wide`` (scale 30) or ``peaked`` (scale 3 plus 700 on the label of the student and on another class of the
    teacher's odd rows)."""
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(B, K, generator=g, dtype=torch.float64) for _ in range(students)]
    t = torch.randn(B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    if kind in ("large", "wide"):
        scale = 100 if kind == "large" else 30
        return [z * scale for z in zs], t * scale, y
    zs, t = [z * 3 for z in zs], t * 3
    if kind == "peaked":
        rows = torch.arange(B)
        for z in zs:
            z[rows, y] += 700.0
        t[rows, torch.where(rows % 2 == 0, y, (y + 1) % K)] += 700.0
    return zs, t, y


class Fixed(nn.Module):
    """A "teacher" that answers fixed logits whatever the batch."""

    def __init__(self, t: Tensor) -> None:
        super().__init__()
        self.register_buffer("t", t)

    def forward(self, x: Tensor) -> Tensor:
        return self.t


def _objective(algo: str, t: Tensor, students: int = 1, **overrides: Any) -> Objective:
    cfg = setup.resolve(Config(algo=algo, dataset="synthetic", students=students, epochs=240, **overrides))
    teacher = Teacher(Fixed(t), None, 1) if METHODS.get(algo).needs_teacher else None
    return METHODS.get(algo).objective(cfg, Context(teacher, K, students)).to(torch.float64)


def _losses(objective: Objective, zs: list[Tensor], y: Tensor, progress: float) -> list[Tensor]:
    """Every student's whole loss at ``progress``, differentiable in its logits."""
    inp = StepInputs(Views(torch.zeros(B, 1, 2, 2, dtype=torch.float64), False), y, [z.detach() for z in zs], K,
                     progress=progress)
    targets, weights = objective.targets(inp), objective.weights_at(progress)
    return [objective(i, z, inp, targets, weights)["loss"] for i, z in enumerate(zs)]


def _agree(ours: Tensor, ref: Tensor, inputs: list[Tensor]) -> None:
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL)
    for a, b in zip(torch.autograd.grad(ours, inputs, retain_graph=True), torch.autograd.grad(ref, inputs),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


# --- transcriptions --------------------------------------------------------------------------------------------


def ref_normalize(logit: Tensor) -> Tensor:
    """{LS_KD} mdistiller/distillers/KD.py: normalize."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def ref_kd_loss(logits_student_in: Tensor, logits_teacher_in: Tensor, temperature: float,
                logit_stand: bool) -> Tensor:
    """{LS_KD} mdistiller/distillers/KD.py: kd_loss (mdistiller's own KD.py without ``logit_stand``)."""
    logits_student = ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def ref_kd_forward(z: Tensor, t: Tensor, y: Tensor, ce_w: float, kd_w: float, temp: float, stand: bool) -> Tensor:
    """{LS_KD} mdistiller/distillers/KD.py: KD.forward_train's two weighted losses, summed by the trainer."""
    loss_ce = ce_w * F.cross_entropy(z, y)
    loss_kd = kd_w * ref_kd_loss(z, t, temp, stand)
    return loss_ce + loss_kd


def ref_loss_kd_regularization(outputs: Tensor, labels: Tensor, alpha: float, t: float, correct_prob: float,
                               multiplier: float = 1.0) -> Tensor:
    """{TFKD} my_loss_function.py:33-51, loss_kd_regularization (``correct_prob`` 0.99 fixed there)."""
    loss_ce = F.cross_entropy(outputs, labels)
    k = outputs.size(1)
    teacher_soft = torch.ones_like(outputs)
    teacher_soft = teacher_soft * (1 - correct_prob) / (k - 1)
    for i in range(outputs.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    loss_soft_regu = nn.KLDivLoss(reduction="mean")(F.log_softmax(outputs, dim=1),
                                                    F.softmax(teacher_soft / t, dim=1)) * multiplier
    return (1.0 - alpha) * loss_ce + alpha * loss_soft_regu


def _gt_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()


def _other_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.ones_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()


def _cat_mask(t: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def ref_dkd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float, beta: float,
                 temperature: float) -> Tensor:
    """{MDISTILLER} mdistiller/distillers/DKD.py: dkd_loss (``size_average=False`` is the sum)."""
    gt_mask = _gt_mask(logits_student, target)
    other_mask = _other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = _cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = _cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature**2) / \
        target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def ref_dkd_forward(z: Tensor, t: Tensor, y: Tensor, alpha: float, beta: float, temp: float, warmup: float,
                    epoch: int) -> Tensor:
    """{MDISTILLER} mdistiller/distillers/DKD.py: DKD.forward_train (CE_WEIGHT 1, ``min(epoch / warmup, 1)``)."""
    loss_ce = 1.0 * F.cross_entropy(z, y)
    loss_dkd = min(epoch / warmup, 1.0) * ref_dkd_loss(z, t, y, alpha, beta, temp)
    return loss_ce + loss_dkd


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def ref_dist(z_s: Tensor, z_t: Tensor, beta: float, gamma: float) -> Tensor:
    """{DIST} lib/models/losses/dist_kd.py: DIST.forward (the CIFAR config ``dist_t4`` divides the logits by
    τ = 4 and multiplies the loss by τ², and weighs it by kd_loss_weight 2: the callers below)."""
    y_s, y_t = z_s.softmax(dim=1), z_t.softmax(dim=1)
    inter_loss = 1 - _pearson(y_s, y_t).mean()
    intra_loss = 1 - _pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return beta * inter_loss + gamma * intra_loss


class RefGradientReversal(torch.autograd.Function):
    """{CTKD} models/temp_global.py: GradientReversalFunction."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grads: Tensor) -> tuple[Tensor, None]:
        return grads.new_tensor(ctx.lambda_) * grads, None


def ref_cosine_decay(i: int, max_value: float = 0.0, min_value: float = -1.0, num_loops: int = 10) -> float:
    """{CTKD} train_student.py:186-203, CosineDecay.get_value."""
    i = min(max(i, 0), num_loops)
    value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
    return value * (max_value - min_value) + min_value


def ref_ctkd(z: Tensor, t: Tensor, y: Tensor, global_t: Tensor, epoch: int) -> Tensor:
    """{CTKD} helper/loops.py (train_distill): ``temp = t_start + t_end·sigmoid(mlp(...))`` with Global_T's
    reversed parameter, DistillKL (distiller_zoo/KD.py) at that temperature; ``-r 0.1 -a 0.9``."""
    decay_value = ref_cosine_decay(epoch)
    temp = 1 + 20 * torch.sigmoid(RefGradientReversal.apply(global_t, decay_value))
    kd = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(z / temp, dim=1), F.softmax(t / temp, dim=1)) * temp * temp
    return 0.1 * F.cross_entropy(z, y) + 0.9 * kd


def ref_dml_kl(logits1: Tensor, logits2: Tensor, eps: float = 1e-8) -> Tensor:
    """{DML} train_image_classifier.py: kl_loss_compute (``eps = 1e-8``; 0 leaves the exact KL)."""
    pred1, pred2 = torch.softmax(logits1, 1), torch.softmax(logits2, 1)
    return torch.mean(torch.sum(pred2 * torch.log(eps + pred2 / (pred1 + eps)), 1))


# --- logit methods through their objectives --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("algo", "overrides"), [
    ("kd", {}), ("kd", {"temperature": 4.0, "alpha": 0.9}), ("kd", {"logit_standardize": True}),
    ("kd", {"logit_standardize": True, "temperature": 3.0}), ("tfkd_self", {"teacher": "mlp", "model": "mlp"}),
])
def test_kd_family_matches_mdistiller(kind: str, algo: str, overrides: dict[str, Any]) -> None:
    (z,), t, y = _case(kind, 1)
    z.requires_grad_(True)
    objective = _objective(algo, t, **overrides)
    (ours,) = _losses(objective, [z], y, 0.5)
    stand = overrides.get("logit_standardize", False)
    temp = overrides.get("temperature", 2.0 if stand else 20.0)
    if stand and "alpha" not in overrides:  # the authors' 0.1·CE + 9·KD
        ref = ref_kd_forward(z, t, y, 0.1, 9.0, temp, True)
    else:  # the thesis's (1 - α)·CE + α·T²·KL: mdistiller's KD with CE_WEIGHT 1 - α and KD_WEIGHT α
        alpha = overrides.get("alpha", 0.5)
        ref = ref_kd_forward(z, t, y, 1 - alpha, alpha, temp, False)
    _agree(ours, ref, [z])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.9, 0.99])
def test_tfkd_smoothed_matches_loss_kd_regularization(kind: str, p: float) -> None:
    (z,), _, y = _case(kind, 2)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("tfkd", z.detach(), virtual_smooth=True, virtual_p=p), [z], y, 0.5)
    _agree(ours, ref_loss_kd_regularization(z, y, 0.5, 20.0, p), [z])


@pytest.mark.parametrize("kind", KINDS)
def test_tfkd_unsmoothed_is_the_papers_virtual_teacher(kind: str) -> None:
    """Yuan et al. 2020, eq. 9 with T = 1 (the code always softens; the calibrated default does not)."""
    (z,), _, y = _case(kind, 3)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("tfkd", z.detach()), [z], y, 0.5)
    v = torch.full((B, K), 0.1 / (K - 1), dtype=torch.float64).scatter_(1, y[:, None], 0.9)
    kl = F.kl_div(F.log_softmax(z, 1), v, reduction="batchmean")
    _agree(ours, 0.5 * F.cross_entropy(z, y) + 0.5 * kl, [z])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("progress", "epoch"), [(0.0, 1), (0.04, 10), (0.5, 121)])
@pytest.mark.parametrize(("teacher", "student", "beta"), [("cnn", "mlp", 8.0), ("resnet56", "resnet20", 2.0),
                                                          ("vgg13", "vgg8", 6.0)])
def test_dkd_matches_mdistiller(kind: str, progress: float, epoch: int, teacher: str, student: str,
                                beta: float) -> None:
    (z,), t, y = _case(kind, 4)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("dkd", t, teacher=teacher, model=student), [z], y, progress)
    _agree(ours, ref_dkd_forward(z, t, y, 1.0, beta, 4.0, 20, epoch), [z])


@pytest.mark.parametrize("kind", ["random", "large"])
def test_dkd_with_logit_standardisation_matches_the_authors(kind: str) -> None:
    """{LS_KD} tools/train.py:115-118: α and β times 9, T = 2, on z-scored logits (DKD.py there)."""
    (z,), t, y = _case(kind, 5)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("dkd", t, logit_standardize=True), [z], y, 0.5)
    zs, ts = ref_normalize(z), ref_normalize(t)
    _agree(ours, F.cross_entropy(z, y) + ref_dkd_loss(zs, ts, y, 9.0, 72.0, 2.0), [z])


@pytest.mark.parametrize("kind", KINDS)
def test_dist_matches_the_authors(kind: str) -> None:
    (z,), t, y = _case(kind, 6)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("dist", t), [z], y, 0.5)
    tau = 4.0
    _agree(ours, F.cross_entropy(z, y) + tau**2 * ref_dist(z / tau, t / tau, 2.0, 2.0), [z])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("progress", "epoch"), [(0.0, 1), (0.02, 5), (0.5, 121)])
def test_ctkd_matches_the_authors_value_and_both_gradients(kind: str, progress: float, epoch: int) -> None:
    (z,), t, y = _case(kind, 7)
    z.requires_grad_(True)
    objective = _objective("ctkd", t)
    (theta,) = objective.student_parameters(0)
    (ours,) = _losses(objective, [z], y, progress)
    global_t = torch.ones(1, dtype=torch.float64, requires_grad=True)  # Global_T: nn.Parameter(torch.ones(1))
    ref = ref_ctkd(z, t, y, global_t, epoch).reshape(())
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL)
    gz, gtheta = torch.autograd.grad(ours, [z, theta])
    rz, rt = torch.autograd.grad(ref, [z, global_t])
    torch.testing.assert_close(gz, rz, rtol=TOL, atol=TOL)
    torch.testing.assert_close(gtheta, rt.reshape(()), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["random", "wide"])  # scale 100 underflows the reference's softmax ratio: NaN
@pytest.mark.parametrize("algo", ["dml", "dml_e"])
def test_dml_matches_the_authors_kl(kind: str, algo: str) -> None:
    """DML's code: each network's loss is its CE plus the mean over peers j of kl_loss_compute(z_i, z_j) (T = 1,
    peers held fixed); ``eps = 0`` (its 1e-8 guards move the value by ~1e-8). DML_e's gradient is DML's
    (DESIGN.md, section 3): its value is the KL to the mean of the peers."""
    zs, _, y = _case(kind, 8, students=3)
    for z in zs:
        z.requires_grad_(True)
    objective = _objective(algo, torch.zeros(B, K, dtype=torch.float64), students=3, alpha=0.5)
    ours = _losses(objective, zs, y, 0.5)
    for i, z in enumerate(zs):
        peers = [p.detach() for j, p in enumerate(zs) if j != i]
        if algo == "dml":
            mutual = sum(ref_dml_kl(z, p, eps=0.0) for p in peers) / len(peers)
        else:
            q = sum(torch.softmax(p, 1) for p in peers) / len(peers)
            mutual = torch.mean(torch.sum(q * torch.log(q / torch.softmax(z, 1)), 1))
        _agree(ours[i], 0.5 * F.cross_entropy(z, y) + 0.5 * mutual, [z])


@pytest.mark.parametrize("kind", KINDS)
def test_kdcl_matches_the_papers_min_logit(kind: str) -> None:
    """Guo et al. 2020, sec. 3.2 (no code was published): z̃^m = z^m − z^m_y, target softmax(min_m z̃^m / T)."""
    zs, _, y = _case(kind, 9, students=2)
    for z in zs:
        z.requires_grad_(True)
    ours = _losses(_objective("kdcl", torch.zeros(B, K, dtype=torch.float64), students=2, temperature=3.0), zs, y,
                   0.5)
    rel = torch.stack([z.detach() - z.detach().gather(1, y[:, None]) for z in zs])
    q = torch.softmax(rel.amin(0) / 3.0, 1)
    for i, z in enumerate(zs):
        kl = F.kl_div(F.log_softmax(z / 3.0, 1), q, reduction="batchmean") * 9.0
        _agree(ours[i], 0.5 * F.cross_entropy(z, y) + 0.5 * kl, [z])


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ls_matches_the_papers_target(eps: float) -> None:
    """Szegedy et al. 2016, sec. 7: q = (1 − ε)·δ_y + ε/K (u uniform), cross-entropy to it."""
    (z,), _, y = _case("random", 10)
    z.requires_grad_(True)
    (ours,) = _losses(_objective("ls", z.detach(), label_smoothing=eps), [z], y, 0.5)
    q = (1 - eps) * F.one_hot(y, K).double() + eps / K
    _agree(ours, -(q * F.log_softmax(z, 1)).sum(1).mean(), [z])


# --- feature losses ---------------------------------------------------------------------------------------------


def _feat(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_hint(f_s: Tensor, f_t: Tensor) -> Tensor:
    """{REPDISTILLER} distiller_zoo/FitNet.py: HintLoss (nn.MSELoss)."""
    return nn.MSELoss()(f_s, f_t)


def ref_at(g_s: list[Tensor], g_t: list[Tensor], p: int = 2) -> list[Tensor]:
    """{REPDISTILLER} distiller_zoo/AT.py: Attention.forward (one loss per stage; train_student sums them × β)."""
    def at(f: Tensor) -> Tensor:
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    def at_loss_ref(f_s: Tensor, f_t: Tensor) -> Tensor:
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        return (at(f_s) - at(f_t)).pow(2).mean()

    return [at_loss_ref(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]


def ref_sp(f_s: Tensor, f_t: Tensor) -> Tensor:
    """{REPDISTILLER} distiller_zoo/SP.py: Similarity.similarity_loss."""
    bsz = f_s.shape[0]
    f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
    g_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    g_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    g_diff = g_t - g_s
    return (g_diff * g_diff).view(-1, 1).sum(0) / (bsz * bsz)


def _ref_pdist(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def ref_rkd(f_s: Tensor, f_t: Tensor, w_d: float = 25, w_a: float = 50) -> Tensor:
    """{REPDISTILLER} distiller_zoo/RKD.py: RKDLoss.forward."""
    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = _ref_pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = _ref_pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def ref_crd(f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor, w_s: Tensor, b_s: Tensor, w_t: Tensor,
            b_t: Tensor, memory_v1: Tensor, memory_v2: Tensor, n_data: int, k: int, t: float = 0.07) -> Tensor:
    """{REPDISTILLER} crd/criterion.py (CRDLoss, ContrastLoss, Embed) and crd/memory.py (ContrastMemory.forward,
    first batch: Z set from it), with the given contrast indices."""
    def embed(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        x = F.linear(x.view(x.shape[0], -1), w, b)
        return x.div(x.pow(2).sum(1, keepdim=True).pow(1.0 / 2))  # Normalize(2)

    def contrast_loss(x: Tensor) -> Tensor:
        bsz, m = x.shape[0], x.size(1) - 1
        pn = 1 / float(n_data)
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + 1e-7)).log_()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + 1e-7)).log_()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz

    v1, v2 = embed(f_s, w_s, b_s), embed(f_t, w_t, b_t)
    bsz, size = v1.size(0), memory_v1.size(1)
    weight_v1 = torch.index_select(memory_v1, 0, contrast_idx.view(-1)).detach().view(bsz, k + 1, size)
    out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(bsz, size, 1)), t))
    weight_v2 = torch.index_select(memory_v2, 0, contrast_idx.view(-1)).detach().view(bsz, k + 1, size)
    out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(bsz, size, 1)), t))
    z_v1, z_v2 = (out_v1.mean() * n_data).item(), (out_v2.mean() * n_data).item()
    out_v1, out_v2 = torch.div(out_v1, z_v1).contiguous(), torch.div(out_v2, z_v2).contiguous()
    return (contrast_loss(out_v1) + contrast_loss(out_v2)).reshape(())


def test_fitnet_hint_matches_repdistiller() -> None:
    fs = _feat(4, 8, 5, 5, seed=1).requires_grad_(True)
    ft = _feat(4, 8, 5, 5, seed=2)
    _agree(hint_loss(fs, ft), ref_hint(fs, ft), [fs])


@pytest.mark.parametrize("sizes", [((6, 6), (6, 6)), ((8, 8), (4, 4)), ((3, 3), (6, 6))])
def test_at_matches_repdistiller(sizes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    (hs, ws), (ht, wt) = sizes
    fs = [_feat(4, 3, hs, ws, seed=3).requires_grad_(True), _feat(4, 5, 2, 2, seed=4).requires_grad_(True)]
    ft = [_feat(4, 6, ht, wt, seed=5), _feat(4, 7, 2, 2, seed=6)]
    _agree(at_loss(fs, ft, beta=1000.0), 1000.0 * sum(ref_at(fs, ft)), fs)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_sp_and_rkd_match_repdistiller(scale: float) -> None:
    fs = (scale * _feat(6, 4, 3, 3, seed=7)).requires_grad_(True)
    ft = scale * _feat(6, 9, 2, 2, seed=8)
    _agree(sp_loss(fs, ft), ref_sp(fs, ft).reshape(()), [fs])
    es = (scale * _feat(6, 12, seed=9)).requires_grad_(True)
    et = scale * _feat(6, 20, seed=10)
    _agree(rkd_loss(es, et)["loss"], ref_rkd(es, et), [es])


def test_crd_matches_repdistiller() -> None:
    n_data, k, dim = 40, 7, 16
    head = CRDHead(12, 20, n_data, dim=dim, k=k, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    fs = _feat(5, 12, seed=11).requires_grad_(True)
    ft = _feat(5, 20, seed=12)
    idx = torch.tensor([3, 17, 0, 39, 21])
    contrast_idx = torch.cat([idx[:, None], torch.randint(0, n_data, (5, k),
                                                          generator=torch.Generator().manual_seed(1))], 1)
    banks = head.memory.memory_s.clone(), head.memory.memory_t.clone()
    ws, bs = head.embed_s.linear.weight, head.embed_s.linear.bias
    ours = head(fs, ft, idx, contrast_idx=contrast_idx, update=False)
    ref = ref_crd(fs, ft, idx, contrast_idx, ws, bs, head.embed_t.linear.weight, head.embed_t.linear.bias,
                  banks[0], banks[1], n_data, k)
    _agree(ours, ref, [fs, ws, bs])


def _docstrings_name_their_commit(fn: Callable[..., Any]) -> str:
    return (fn.__doc__ or "").format(**globals())


def test_every_transcription_names_its_repository_and_commit() -> None:
    refs = [v for k, v in globals().items() if k.startswith("ref_") and callable(v)]
    assert len(refs) >= 12
    for fn in refs:
        doc = _docstrings_name_their_commit(fn)
        assert "@" in doc, fn.__name__
        assert "/" in doc, fn.__name__


PCL = "shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb4730bc5a35a11f7a0097ef94d0d17d3b6772"


def ref_pm_loss(pred: Tensor, targets: list[Tensor], temperature: float = 3.0) -> Tensor:
    """{PCL} src/losses/kd_loss.py: PMLoss (the mean over the peers' mean teachers of KDLoss, batchmean, T²)."""
    loss = torch.zeros((), dtype=pred.dtype)
    for target in targets:
        target = target.detach()
        loss = loss + nn.KLDivLoss(reduction="batchmean")(F.log_softmax(pred / temperature, dim=1),
                                                          F.softmax(target / temperature, dim=1)) * temperature**2
    return loss / len(targets)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("students", [2, 3])
def test_pcl_matches_the_re_implementations_peer_mean_loss(kind: str, students: int) -> None:
    """One KL to the peers' mean (pcl) against the re-implementation's mean of KLs (no official code): equal with
    one peer; with several, the same gradient (DESIGN.md, section 3) and a value that differs by the peers'
    entropies only."""
    from distillistic.core.divergences import kl
    from distillistic.methods.pcl import peer_mean_target

    zs, _, _ = _case(kind, 11, students=students + 1)
    z, ema = zs[0].requires_grad_(True), torch.stack(zs[1:])  # z: student 0; ema: every student's EMA copy
    ema = torch.cat([z.detach()[None] * 0.9, ema[: students - 1]])  # student 0's own copy first
    ours = kl(peer_mean_target(ema, 3.0)[0:1], z, 3.0)
    ref = ref_pm_loss(z, list(ema[1:]))
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, [z]), torch.autograd.grad(ref, [z])
    torch.testing.assert_close(g_ours, g_ref, rtol=TOL, atol=TOL)
    if students == 2:
        torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL)


def test_dkd_defaults_come_from_the_pair_table_and_imagenets_warmup() -> None:
    """Unset, β is mdistiller's for the pair (8 for any other), the warm-up 20/240 or, with 1,000 classes, one
    epoch; with logit standardisation α and β are 9 times theirs; a value the user sets is kept."""
    from distillistic.methods.dkd import dkd_settings

    def settings(classes: int = 10, **over: Any) -> tuple[float, float, float]:
        cfg = setup.resolve(Config(algo="dkd", dataset="synthetic", epochs=100, **over))
        return dkd_settings(cfg, classes)

    assert settings(teacher="wrn_40_2", model="wrn_16_2") == (1.0, 6.0, 20 / 240)
    assert settings(teacher="resnet32x4", model="shufflenetv2") == (1.0, 8.0, 20 / 240)
    assert settings(teacher="cnn", model="mlp") == (1.0, 8.0, 20 / 240)
    assert settings(1000, teacher="resnet56", model="resnet20") == (1.0, 2.0, 1 / 100)
    assert settings(teacher="resnet56", model="resnet20", logit_standardize=True) == (9.0, 18.0, 20 / 240)
    assert settings(teacher="resnet56", model="resnet20", dkd_beta=3.0, dkd_warmup=0.5) == (1.0, 3.0, 0.5)
