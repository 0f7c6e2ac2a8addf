"""Pure loss and target functions of the modern logit-based methods (DESIGN.md, section 8).

Conventions: student logits ``z`` ``[B, K]``, teacher logits ``t`` ``[B, K]``, labels ``y`` int64 ``[B]``,
``p^T = softmax(z / T)``. Every function casts its inputs with ``.float()`` and does its arithmetic in float32
whatever the autocast context (the ops used here are not autocast to lower precision: elementwise ops,
(log_)softmax, logsumexp and cross_entropy keep or promote float32). Targets (teacher signals, peers, EMA
copies) are detached. "batchmean" = sum over classes, mean over the batch.

Each method was checked against its authors' reference code; where this module differs (always in how a value
is computed, never in the value) the function's comment says so:

* label smoothing: ``torch.nn.functional.cross_entropy(label_smoothing=eps)``;
* DKD (Zhao et al. 2022): megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``;
* DIST (Huang et al. 2022): hunto/image_classification_sota, ``lib/models/losses/dist_kd.py`` (DIST_KD's code);
* logit standardisation (Sun et al. 2024): sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``;
* CTKD (Li et al. 2023): zhengli97/CTKD, ``models/temp_global.py`` and ``train_student.py`` (``CosineDecay``);
* KDCL-MinLogit (Guo et al. 2020): the paper, sec. 3.2 (no reference code was published);
* PCL (Wu & Gong 2021): the paper; the mean-teacher code it builds on (Tarvainen & Valpola 2017,
  ``ramps.sigmoid_rampup``, ``update_ema_variables``) and the public re-implementation
  shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation (no official code was published).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Logit standardisation's published defaults (logit-standardization-KD, tools/train.py: --base-temp 2
# --kd-weight 9; a few CIFAR pairs in its README use a base temperature of 3).
LS_BASE_TEMPERATURE = 2.0
LS_KD_WEIGHT = 9.0


def _kl_batchmean(q: Tensor, log_q: Tensor, log_p: Tensor) -> Tensor:
    """``(1/B) sum_b sum_c q (log q - log p)``; ``xlogy``-style: a class with ``q = 0`` contributes exactly 0."""
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1).mean()


def kd_loss(z: Tensor, t: Tensor, temperature: float | Tensor) -> Tensor:
    """Hinton KD: ``T² · KL(softmax(t/T) ‖ softmax(z/T))``, batchmean. ``z``, ``t``: ``[B, K]`` → scalar.

    ``temperature`` may be a tensor with a graph (CTKD's learnable temperature): the teacher's logits are
    detached but the loss stays differentiable in ``T`` through both distributions, as in CTKD's DistillKL.
    """
    temp = temperature.float() if isinstance(temperature, Tensor) else temperature
    log_q = F.log_softmax(t.detach().float() / temp, dim=-1)
    log_p = F.log_softmax(z.float() / temp, dim=-1)
    return temp**2 * _kl_batchmean(log_q.exp(), log_q, log_p)


# --- label smoothing -----------------------------------------------------------------------------------------


def label_smoothing_target(y: Tensor, num_classes: int, eps: float) -> Tensor:
    """``(1 − ε)·onehot(y) + ε/K`` as float32 ``[B, K]`` (Szegedy et al. 2016; PyTorch's convention)."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1], got {eps}")
    onehot = F.one_hot(y.long(), num_classes).float()
    return onehot * (1.0 - eps) + eps / num_classes


def soft_cross_entropy(z: Tensor, q: Tensor) -> Tensor:
    """``(1/B) Σ_b −Σ_k q_bk log softmax(z_b)_k`` for a detached target distribution ``q`` ``[B, K]``."""
    # F.cross_entropy with probability targets computes exactly this sum, fused (one log_softmax, no copy).
    return F.cross_entropy(z.float(), q.detach().float())


def label_smoothing_cross_entropy(z: Tensor, y: Tensor, eps: float) -> Tensor:
    """Cross-entropy of ``z`` ``[B, K]`` to ``label_smoothing_target(y, K, eps)``, mean over the batch.

    Delegates to ``F.cross_entropy(z, y, label_smoothing=eps)``: with class indices PyTorch applies the same
    ``(1 − ε)·onehot + ε/K`` target without materialising a ``[B, K]`` tensor, and at ``eps = 0`` takes the very
    code path of plain cross-entropy, so a run with ``eps = 0`` is bitwise identical to the baseline (a soft
    target ``onehot`` sums ``0·log p`` terms and a different reduction, equal only to rounding).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1], got {eps}")
    return F.cross_entropy(z.float(), y.long(), label_smoothing=eps)


# --- DKD -----------------------------------------------------------------------------------------------------


def _split_target(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The target logit ``[B, 1]`` and the ``K − 1`` non-target logits ``[B, K − 1]`` (in class order)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError("DKD needs at least two classes")
    y = y.long().view(-1, 1)
    # column j < y keeps class j, j >= y takes class j + 1: a gather, no boolean mask (that would sync the GPU)
    cols = torch.arange(k - 1, device=logits.device).expand(logits.shape[0], -1)
    return logits.gather(1, y), logits.gather(1, cols + (cols >= y).long())


def dkd_loss(z: Tensor, t: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> dict[str, Tensor]:
    """Decoupled KD (Zhao et al. 2022, CVPR, eq. 7): ``{"tckd", "nckd", "loss"}``, each a scalar.

    ``tckd = KL([p_t,y, 1 − p_t,y] ‖ [p_s,y, 1 − p_s,y])``, ``nckd = KL(p̂_t ‖ p̂_s)`` with ``p̂`` the softmax over
    the ``K − 1`` non-target classes, both at ``T`` and batchmean; ``loss = T²·(α·tckd + β·nckd)``; the "tckd"
    and "nckd" entries are without ``T²``. Defaults: mdistiller's CIFAR-100 setting (α = 1, β = 8, T = 4, with
    warm-up 20 epochs: multiply by ``linear_warmup``). Identity: ``KL(p_t ‖ p_s) = tckd + (1 − p_t,y)·nckd``.

    Deviations from the reference (same values, computed more robustly): the reference masks the target logit
    by subtracting 1000 before the softmax; here the ``K − 1`` non-target logits are gathered, so nothing leaks
    whatever the logits' scale. The reference takes ``log`` of the summed probabilities ``[p_y, Σ_{k≠y} p_k]``,
    which is ``−inf`` (and the KL NaN) once ``1 − p_y`` underflows; here the binary log-probabilities are
    ``log_softmax([z_y, logsumexp_{k≠y} z_k] / T)``, exact and finite.
    """
    zt_s, zn_s = _split_target(z.float() / temperature, y)
    zt_t, zn_t = _split_target(t.detach().float() / temperature, y)
    log_b_s = F.log_softmax(torch.cat([zt_s, torch.logsumexp(zn_s, dim=1, keepdim=True)], dim=1), dim=1)
    log_b_t = F.log_softmax(torch.cat([zt_t, torch.logsumexp(zn_t, dim=1, keepdim=True)], dim=1), dim=1)
    tckd = _kl_batchmean(log_b_t.exp(), log_b_t, log_b_s)
    log_n_s, log_n_t = F.log_softmax(zn_s, dim=1), F.log_softmax(zn_t, dim=1)
    nckd = _kl_batchmean(log_n_t.exp(), log_n_t, log_n_s)
    return {"tckd": tckd, "nckd": nckd, "loss": temperature**2 * (alpha * tckd + beta * nckd)}


def linear_warmup(progress: float, warmup: float) -> float:
    """``min(progress / warmup, 1)`` (DKD's loss warm-up; ``warmup <= 0`` means none).

    mdistiller calls it with the 1-based epoch and ``warmup = 20``: the first epoch already weighs 1/20.
    """
    if warmup <= 0:
        return 1.0
    return min(max(progress, 0.0) / warmup, 1.0)


# --- DIST ----------------------------------------------------------------------------------------------------


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` ``[N, D]`` → ``[N]``.

    As the reference: cosine of the centred rows with ``eps`` added to the product of the norms.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(z: Tensor, t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> dict[str, Tensor]:
    """DIST (Huang et al. 2022, NeurIPS): ``{"inter", "intra", "loss"}``, each a scalar.

    With ``y = softmax(·/τ)`` ``[B, K]``: ``inter = 1 − mean_b pearson(y_s[b, :], y_t[b, :])``,
    ``intra = 1 − mean_k pearson(y_s[:, k], y_t[:, k])`` (over the batch), ``loss = τ²·(β·inter + γ·intra)``;
    "inter" and "intra" are without ``τ²``. Defaults are the reference's ``DIST(beta=1, gamma=1, tau=1)``; its
    published configs weigh the whole term by ``kd_loss_weight = 2`` (the paper's β = γ = 2): ImageNet with
    τ = 1 (``resnet_dist.yaml``), CIFAR-100 with τ = 4 (``dist_cifar.yaml``, ``kd: dist_t4``). The intra term
    needs the whole batch (B ≥ 2); it is not a per-sample loss.
    """
    y_s = F.softmax(z.float() / tau, dim=1)
    y_t = F.softmax(t.detach().float() / tau, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return {"inter": inter, "intra": intra, "loss": tau**2 * (beta * inter + gamma * intra)}


# --- logit standardisation -----------------------------------------------------------------------------------


def standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each sample's logits (Sun et al. 2024, CVPR, eq. 9): ``(z − mean_k z) / (eps + std_k z)``.

    As the reference: the unbiased (Bessel, ``K − 1``) standard deviation and ``eps = 1e-7`` added to it.
    ``z``: ``[B, K]`` with ``K >= 2`` → ``[B, K]`` float32.
    """
    z = z.float()
    std, mean = torch.std_mean(z, dim=-1, keepdim=True)
    return (z - mean) / (eps + std)


def standardized_kd_loss(z: Tensor, t: Tensor, temperature: float = LS_BASE_TEMPERATURE) -> Tensor:
    """KD on standardised logits of both student and teacher, ``T² · KL`` batchmean (their ``kd_loss``).

    The authors weigh it by ``LS_KD_WEIGHT = 9`` with a CE weight of 1 (their CIFAR-100 runs).
    """
    return kd_loss(standardize(z), standardize(t.detach()), temperature)


# --- CTKD ----------------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``−λ`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def reverse_grad(x: Tensor, lam: float) -> Tensor:
    """``x`` unchanged; the gradient reaching ``x`` is ``−λ`` times the gradient of the loss w.r.t. the output.

    CTKD's reference multiplies by ``λ_ref`` and makes ``λ_ref`` run from 0 to −1; here the sign lives in the
    function and ``λ`` runs from 0 to 1 (``λ = −λ_ref``), the same gradient.
    """
    out: Tensor = GradientReversal.apply(x, lam)
    return out


def cosine_lambda(progress: float, lambda_max: float = 1.0, lambda_min: float = 0.0,
                  ramp: float = 10 / 240) -> float:
    """CTKD's reversal strength: a cosine ramp from ``lambda_min`` at 0 to ``lambda_max`` at ``ramp``, then flat.

    ``progress`` and ``ramp`` are shares of training (e.g. ``epoch / epochs``): ``λ = λ_min + (λ_max − λ_min) ·
    (1 − cos(π·min(progress / ramp, 1))) / 2``. Reference (CTKD ``CosineDecay(max_value=0, min_value=-1,
    num_loops=10)`` called with the 1-based epoch of 240): ``λ_ref = −λ`` with these defaults.
    """
    share = 1.0 if ramp <= 0 else min(max(progress, 0.0) / ramp, 1.0)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * share)) / 2.0


class LearnableTemperature(nn.Module):
    """CTKD's global temperature (Li et al. 2023, AAAI): ``T = t_min + t_range·sigmoid(θ)``, θ trained adversarially.

    Reference (``Global_T`` and ``train_student.py``): θ a one-element parameter initialised to 1, ``T = 1 +
    20·sigmoid(θ)`` (so ``T ∈ (1, 21)``, initially ≈ 15.62), the gradient reversed on θ before the sigmoid
    (equal to reversing it on ``T``: the chain rule is linear). θ is a 0-d parameter here. The reference trains θ
    with the students' SGD (same learning rate, momentum and weight decay).
    """

    def __init__(self, t_min: float = 1.0, t_range: float = 20.0, init: float = 1.0) -> None:
        super().__init__()
        self.t_min = t_min
        self.t_range = t_range
        self.theta = nn.Parameter(torch.tensor(float(init)))

    def forward(self, lam: float) -> Tensor:
        """The temperature, a 0-d float32 tensor whose gradient reaches θ multiplied by ``−lam``."""
        return self.t_min + self.t_range * torch.sigmoid(reverse_grad(self.theta.float(), lam))


# --- KDCL-MinLogit -------------------------------------------------------------------------------------------


def kdcl_min_logit_target(logits: Sequence[Tensor] | Tensor, y: Tensor, temperature: float) -> Tensor:
    """KDCL-MinLogit (Guo et al. 2020, CVPR, sec. 3.2): the ensemble target shared by all ``M`` members.

    ``z̃^m = z^m − z^m_y·1`` (each member's logits relative to its true-class logit, so ``z̃^m_y = 0``), then the
    element-wise minimum over members, ``softmax(min_m z̃^m / T)``: for each class the member that separates it
    most from the true class. ``logits``: ``M`` tensors ``[B, K]`` or one ``[M, B, K]`` → detached ``[B, K]``.
    """
    stacked = torch.stack(list(logits)) if not isinstance(logits, Tensor) else logits
    stacked = stacked.detach().float()
    index = y.long().view(1, -1, 1).expand(stacked.shape[0], -1, 1)
    relative = stacked - stacked.gather(2, index)
    return F.softmax(relative.amin(dim=0) / temperature, dim=-1)


# --- PCL -----------------------------------------------------------------------------------------------------


def sigmoid_rampup(progress: float, rampup: float) -> float:
    """Consistency weight ramp-up ``exp(−5·(1 − t/t_r)²)`` for ``t < t_r``, 1 after (mean teacher, used by PCL).

    Same as mean-teacher's ``ramps.sigmoid_rampup`` (``t`` clipped to ``[0, t_r]``, ``t_r = 0`` → 1). Note: the
    public PCL re-implementation divides by the weight (``1 − epoch / lambd``) instead of ``t_r``, a bug.
    """
    if rampup <= 0:
        return 1.0
    phase = 1.0 - min(max(progress, 0.0), rampup) / rampup
    return math.exp(-5.0 * phase * phase)


def mean_teacher_decay(step: int, decay: float) -> float:
    """``min(1 − 1/(step + 1), decay)``: mean teacher's (and PCL re-implementation's) EMA decay schedule.

    Early on the EMA is then the true average of the weights seen so far (step 0 copies the model).
    """
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float, copy_buffers: bool = True) -> None:
    """In place: ``θ' ← d·θ' + (1 − d)·θ`` for every parameter (PCL's temporal mean, Wu & Gong 2021, d = 0.999).

    Call after the optimizer step. With ``copy_buffers`` the buffers (BatchNorm running statistics,
    ``num_batches_tracked``) are copied from ``model``, so an EMA copy that is only ever run in ``eval()`` mode
    has statistics of the right scale. Mean teacher's ``update_ema_variables`` and the PCL re-implementation
    average the parameters only and leave the buffers to the EMA model's own forward passes in ``train()`` mode
    (their EMA models run in train mode every step): pass ``copy_buffers=False`` to reproduce that.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        raise ValueError("ema and model have different parameters")
    names = list(model_params)
    targets: list[Tensor] = [ema_params[n] for n in names]
    sources = [model_params[n].detach() for n in names]
    if targets:
        # lerp: θ' + (1 − d)(θ − θ') = d·θ' + (1 − d)·θ, one fused kernel per device and dtype
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
    if copy_buffers:
        model_buffers = dict(model.named_buffers())
        for name, buffer in ema.named_buffers():
            buffer.copy_(model_buffers[name])


def peer_mean_target(ema_logits: Tensor, temperature: float) -> Tensor:
    """PCL's peer mean teacher: row ``i`` is ``mean_{j≠i} softmax(z'_j / T)``. ``[M, B, K]`` → ``[M, B, K]``, M ≥ 2.

    One KL to this mean gives the same gradient as the mean of the ``M − 1`` KLs that the PCL re-implementation
    sums (DESIGN.md, section 3); the loss values differ by the peers' entropies. Each row is averaged from its
    own ``M − 1`` terms rather than ``(Σ_j p_j − p_i)/(M − 1)``, which cancels catastrophically on small entries.
    """
    probs = F.softmax(ema_logits.detach().float() / temperature, dim=-1)
    m = probs.shape[0]
    if m < 2:
        raise ValueError("a peer mean needs at least two members")
    return torch.stack([torch.cat([probs[:i], probs[i + 1 :]]).mean(dim=0) for i in range(m)])
