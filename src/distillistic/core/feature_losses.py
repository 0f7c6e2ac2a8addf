"""Feature-distillation losses (DESIGN.md section 8): FitNets, AT, SP, RKD, and the adapters they train.

Every loss takes the student's tensors first and the teacher's second. Teacher tensors are detached here
(the caller runs the teacher under ``no_grad`` anyway), so gradients reach only the student's side and the
trainable adapters (a FitNets regressor, CRD's two embeddings). Half-precision inputs
are computed in float32 (norms and pairwise distances overflow or lose the small differences in fp16);
float64 stays float64, which the golden tests use.

Each function was checked against the authors' or RepDistiller's code (HobbitLong/RepDistiller,
distiller_zoo/*.py; megvii-research/mdistiller); deviations are stated where they are made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CRDHead", "ContrastMemory", "Embed", "at_loss", "attention_map", "crd_loss", "hint_loss", "make_regressor",
           "nce_loss", "pool_to", "rkd_loss", "sp_loss"]


def _full(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision, else unchanged (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pool_to(ft: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of a map ``[B, C, H, W]`` to ``[B, C, h, w]`` with ``h <= H``, ``w <= W``.

    Cross-resolution KD: the teacher sees the full-resolution image and the student a downscaled view, so the
    teacher's map is averaged down to the student's grid. A map already of that size is returned as it is
    (adaptive pooling to the same size is the identity, but skipping it keeps the tensor itself). Pooling
    cannot enlarge a map: a larger ``size`` is an error rather than a silent duplication of pixels.
    """
    if ft.dim() != 4:
        raise ValueError(f"pool_to expects a [B, C, H, W] map, got shape {tuple(ft.shape)}")
    h, w = int(size[0]), int(size[1])
    if (h, w) == tuple(ft.shape[-2:]):
        return ft
    if h > ft.shape[-2] or w > ft.shape[-1] or h < 1 or w < 1:
        raise ValueError(f"cannot pool a {tuple(ft.shape[-2:])} map to {(h, w)}: pooling only shrinks")
    return F.adaptive_avg_pool2d(ft, (h, w))


def _common_grid(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps pooled to the smaller height and the smaller width (each dimension on its own).

    RepDistiller's AT compares heights only and pools to a square ``(H, H)``; pooling each dimension to its
    minimum is the same for square maps and also right for non-square ones.
    """
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    return pool_to(fs, size), pool_to(ft, size)


def hint_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015, eq. 3): ``mean((r(F_s) - F_t)^2)`` over every element.

    ``fs``: the regressed student features ``r(F_s)`` (see :func:`make_regressor`), same shape as ``ft``
    (``[B, C, H, W]`` or ``[B, D]``). The mean over all elements is RepDistiller's ``nn.MSELoss()``; the paper's
    ``1/2 ||.||^2`` differs by a constant factor that the loss weight absorbs (RepDistiller uses weight 100).
    """
    if fs.shape != ft.shape:
        raise ValueError(f"hint_loss needs equal shapes (regress the student first): {tuple(fs.shape)} vs "
                         f"{tuple(ft.shape)}")
    return F.mse_loss(_full(fs), _full(ft.detach()))


class _ConvRegressor(nn.Module):
    """1x1 conv + BN (+ ReLU) at the student's resolution, then resized to the teacher's ``(H, W)``."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int], relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_s, H_s, W_s]`` -> ``[B, C_t, H_t, W_t]``."""
        y = self.relu(self.bn(self.conv(x)))
        if tuple(y.shape[-2:]) == self.size:
            return y
        if y.shape[-2] >= self.size[0] and y.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(y, self.size)
        return F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)


def make_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int], relu: bool = False) -> nn.Module:
    """The FitNets regressor ``r`` from a student feature shape to a teacher one (shapes include the batch).

    4-D ``[B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]``: 1x1 conv + BatchNorm, then adaptive average pooling when
    the student map is larger, bilinear interpolation when it is smaller. 2-D ``[B, D_s] -> [B, D_t]``: Linear.

    Deviation from RepDistiller's ``ConvReg``: it picks a 3x3 stride-2 conv (``H_s = 2 H_t``), a 4x4 transposed
    conv (``2 H_s = H_t``) or a ``(1 + H_s - H_t)`` valid conv, and fails otherwise. A 1x1 conv followed by a
    parameter-free resize handles every ratio (including the non-integer ones of cross-resolution KD) with the
    fewest parameters. ``relu=False`` by default, unlike ``ConvReg(use_relu=True)``: torchvision's stage outputs
    (MobileNet's linear bottlenecks, ConvNeXt's stages) are signed, which a ReLU could never match; pass
    ``relu=True`` for post-ReLU hints such as ResNet stages to reproduce RepDistiller.
    """
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if len(s) == 4 and len(t) == 4:
        return _ConvRegressor(s[1], t[1], (t[2], t[3]), relu)
    if len(s) == 2 and len(t) == 2:
        return nn.Sequential(nn.Linear(s[1], t[1]), nn.ReLU()) if relu else nn.Linear(s[1], t[1])
    raise ValueError(f"make_regressor needs two 4-D or two 2-D shapes, got {s} and {t}")


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention (Zagoruyko & Komodakis 2017, eq. 2): ``a = normalize(mean_c |F_c|^p)``, ``[B, H*W]``.

    ``f``: ``[B, C, H, W]``. The l2 normalisation is per sample (``F.normalize``, eps 1e-12), so ``a`` does not
    change when ``f`` is multiplied by a positive constant. The paper's ``|F|^p`` is kept; RepDistiller writes
    ``f.pow(p)``, which is the same for the even ``p = 2`` that every reference run uses.
    """
    if f.dim() != 4:
        raise ValueError(f"attention_map expects a [B, C, H, W] map, got shape {tuple(f.shape)}")
    f = _full(f)
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(fs_list: Sequence[torch.Tensor], ft_list: Sequence[torch.Tensor], beta: float = 1000.0,
            p: float = 2.0) -> torch.Tensor:
    """Attention transfer: ``beta * sum_stages mean_{b, j} (a_s[b, j] - a_t[b, j])^2``.

    ``fs_list[i]``, ``ft_list[i]``: ``[B, C_s, H, W]`` and ``[B, C_t, H', W']``; channels may differ, the larger
    grid is average-pooled to the smaller (RepDistiller). The reduction is the authors' code: the mean over
    batch and positions of the squared difference per stage, summed over stages, times ``beta = 1000``
    (szagoruyko/attention-transfer cifar.py ``opt.beta * sum(loss_groups)`` with ``--beta 1e+3``, RepDistiller
    ``-b 1000`` times ``sum(loss_group)``, mdistiller the same). The paper's eq. 2 writes ``beta / 2`` with the
    norm unsquared; neither reference implements the 1/2, so ``beta`` here multiplies the sum as in both codes
    (DESIGN.md's ``beta/2`` equals ``at_loss(..., beta=500)``).
    """
    if len(fs_list) != len(ft_list) or not fs_list:
        raise ValueError(f"at_loss needs the same non-zero number of stages, got {len(fs_list)} and {len(ft_list)}")
    total = torch.zeros((), dtype=_full(fs_list[0]).dtype, device=fs_list[0].device)
    for fs, ft in zip(fs_list, ft_list, strict=True):
        s, t = _common_grid(fs, ft.detach())
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return beta * total


def _gram_rows(f: torch.Tensor) -> torch.Tensor:
    q = _full(f).flatten(1)
    return F.normalize(q @ q.t(), dim=1)


def sp_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Similarity preserving (Tung & Mori 2019, eqs. 2-4): ``||G_s - G_t||_F^2 / B^2``.

    ``fs``: ``[B, ...]``, ``ft``: ``[B, ...]`` (any widths). ``G = row_normalize(Q Q^T)`` with ``Q`` the flattened
    features, ``[B, B]``. As RepDistiller's ``Similarity`` (verified by the paper's author), returned as a 0-d
    tensor rather than its shape-[1] one. Invariant to a positive scale of either feature tensor.
    """
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"sp_loss needs the same batch: {fs.shape[0]} vs {ft.shape[0]}")
    b = fs.shape[0]
    return (_gram_rows(fs) - _gram_rows(ft.detach())).pow(2).sum() / (b * b)


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` via ``|a|^2 + |b|^2 - 2 a.b`` clamped at ``eps``, zero diagonal (RKD)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = _pdist(e)
    positive = d > 0  # the mean of the non-zero distances without boolean indexing, which would sync the host
    return d / ((d * positive).sum() / positive.sum())


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``cos`` of the angle at vertex ``i`` between ``e_j - e_i`` and ``e_k - e_i``, ``[B^3]`` (``[i, j, k]``)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(e_j - e_i); 0 when j = i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(es: torch.Tensor, et: torch.Tensor, w_dist: float = 25.0,
             w_angle: float = 50.0) -> dict[str, torch.Tensor]:
    """Relational KD (Park et al. 2019, eqs. 4-7) on embeddings ``es`` ``[B, ...]``, ``et`` ``[B, ...]``.

    distance = ``smooth_l1(psi_D(s), psi_D(t))`` with ``psi_D = ||e_i - e_j|| / mu`` and ``mu`` the mean of the
    non-zero pairwise distances; angle = ``smooth_l1(psi_A(s), psi_A(t))`` over all ``B^3`` triplets with
    ``psi_A = cos angle(e_j - e_i, e_k - e_i)``. Returns ``{"distance", "angle", "loss"}``, ``loss =
    w_dist * distance + w_angle * angle``. As RepDistiller's ``RKDLoss``: distances via the clamped (1e-12)
    squared expansion, Huber with delta 1 averaged over all ``B^2`` / ``B^3`` entries, degenerate triplets
    (``j = i`` or ``k = i``) included with cosine 0 on both sides.
    """
    if es.shape[0] != et.shape[0]:
        raise ValueError(f"rkd_loss needs the same batch: {es.shape[0]} vs {et.shape[0]}")
    s, t = _full(es).flatten(1), _full(et.detach()).flatten(1)
    distance = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
    angle = F.smooth_l1_loss(_angles(s), _angles(t))
    return {"distance": distance, "angle": angle, "loss": w_dist * distance + w_angle * angle}


# --- CRD: contrastive representation distillation (Tian, Krishnan & Isola 2020) -------------------------------


class Embed(nn.Module):
    """CRD's projection head: ``x`` ``[B, ...]`` -> flatten -> Linear -> l2-normalised ``[B, dim_out]``.

    RepDistiller divides by the norm with no epsilon; ``F.normalize`` (eps 1e-12) is the same except for an
    all-zero projection, which would be NaN there.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, dim_in]`` or any ``[B, ...]`` with ``dim_in`` elements per sample -> ``[B, dim_out]``."""
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """Two memory banks ``[n_data, dim]`` (student and teacher embeddings), keyed by the sample's dataset index.

    Buffers, so that ``state_dict()`` holds them: ``memory_s``, ``memory_t`` (uniform in ``+-1/sqrt(dim/3)`` at
    the start, as the reference) and ``z`` = ``[Z_s, Z_t]``, the NCE normalisation constants, ``-1`` until the
    first forward sets them to ``mean(exp(<v, m>/T)) * n_data`` of that batch (reference ``params[2:4]``).
    Restoring ``state_dict()`` and the generator's state restores the next loss exactly.

    The bank update (:meth:`update_`) runs inside :meth:`forward`, after this batch was scored against the
    old banks, as RepDistiller's ``ContrastMemory.forward``; ``update=False`` defers it to the caller, who
    must then call ``update_`` once per step (e.g. with the embeddings all-gathered across DDP ranks, since
    each rank otherwise writes only its own samples).
    """

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor

    def __init__(self, dim: int, n_data: int, k: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_data < 1 or k < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"ContrastMemory: bad n_data={n_data}, k={k}, temperature={temperature} or "
                             f"momentum={momentum}")
        self.n_data, self.k, self.temperature, self.momentum = n_data, k, temperature, momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n_data, dim, generator=generator) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))

    def sample(self, idx: torch.Tensor, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """Indices ``[B, K + 1]``: column 0 the positive ``idx``, then ``K`` negatives.

        Without ``labels``: uniform over the dataset with replacement (the reference's ``AliasMethod`` with
        uniform weights, which may also draw the positive). With ``labels`` ``[n_data]`` (every sample's class):
        negatives from other classes only, without replacement when there are enough, as RepDistiller's
        ``CIFAR100InstanceSample(mode="exact")`` that its CRD runs use. Drawn on the generator's device.
        """
        device = generator.device if generator is not None else self.memory_s.device
        b = idx.shape[0]
        if labels is None:
            neg = torch.randint(0, self.n_data, (b, self.k), generator=generator, device=device)
        else:
            labels = labels.to(device)
            allowed = (labels.unsqueeze(0) != labels[idx.to(device)].unsqueeze(1)).float()  # [B, n_data]
            replace = bool((allowed.sum(1) < self.k).any())
            neg = torch.multinomial(allowed, self.k, replacement=replace, generator=generator)
        return torch.cat([idx.to(device).view(-1, 1), neg], dim=1).to(self.memory_s.device)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, generator: torch.Generator | None = None,
                update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``P(i | v) = exp(<m_i, v> / T) / Z`` for the ``K + 1`` sampled indices, ``([B, K+1], [B, K+1])``.

        ``out_s``: the student embedding ``v_s`` ``[B, dim]`` against the teacher bank; ``out_t``: the teacher
        embedding against the student bank (reference ``out_v1``, ``out_v2``). Computed in float32 at least,
        outside autocast: ``exp(1 / 0.07) = 1.6e6`` overflows fp16.
        """
        if contrast_idx is None:
            contrast_idx = self.sample(idx, generator)
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            outs = []
            for bank, v in ((self.memory_t, v_s), (self.memory_s, v_t)):
                w = bank[contrast_idx].to(_full(v).dtype)  # [B, K+1, dim], no grad: a buffer
                outs.append(torch.exp(torch.bmm(w, _full(v).unsqueeze(2)).squeeze(2) / self.temperature))
            with torch.no_grad():  # Z from the first batch, without a host sync: where(unset, estimate, Z)
                estimate = torch.stack([o.mean() for o in outs]).to(self.z.dtype) * self.n_data
                self.z.copy_(torch.where(self.z < 0, estimate, self.z))
            out_s, out_t = (o / self.z[i].to(o.dtype) for i, o in enumerate(outs))
        if update:
            self.update_(idx, v_s, v_t)
        return out_s, out_t

    @torch.no_grad()
    def update_(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """``m_i <- normalize(momentum * m_i + (1 - momentum) * v)`` for both banks at the rows ``idx`` ``[B]``.

        As the reference, repeated indices in one batch make ``index_copy_`` keep one of the rows (which one is
        unspecified on CUDA); the dataset sampler gives each index once per epoch.
        """
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            pos = bank.index_select(0, idx) * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum)
            bank.index_copy_(0, idx, pos / pos.pow(2).sum(1, keepdim=True).sqrt())


def nce_loss(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE objective (paper eq. 18, RepDistiller ``ContrastLoss``) for scores ``x`` ``[B, K + 1]``.

    With column 0 the positive, ``m = K`` and noise ``P_n = 1 / n_data``:
    ``-(1/B) sum_b [log(x_b0 / (x_b0 + m P_n + eps)) + sum_{j>=1} log(m P_n / (x_bj + m P_n + eps))]``.
    """
    m = x.shape[1] - 1
    mpn = m / float(n_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + mpn + eps))
    log_d0 = torch.log(mpn / (x[:, 1:] + mpn + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def crd_loss(fs: torch.Tensor, ft: torch.Tensor, idx: torch.Tensor, embed_s: nn.Module, embed_t: nn.Module,
             memory: ContrastMemory, contrast_idx: torch.Tensor | None = None,
             generator: torch.Generator | None = None, update: bool = True) -> torch.Tensor:
    """CRD loss (RepDistiller ``CRDLoss``): ``nce(out_s) + nce(out_t)`` on the embedded penultimate features.

    ``fs`` ``[B, d_s]``, ``ft`` ``[B, d_t]`` (e.g. the pooled features a :class:`distillistic.models.taps.Taps`
    "embedding" captures), ``idx`` ``[B]`` the samples' dataset indices. ``embed_t`` is trained too (it is in
    RepDistiller's trainable list); the teacher features themselves are detached. Updates the banks unless
    ``update=False`` (see :class:`ContrastMemory`).
    """
    v_s, v_t = embed_s(fs), embed_t(ft.detach())
    out_s, out_t = memory(v_s, v_t, idx, contrast_idx, generator, update)
    return nce_loss(out_s, memory.n_data) + nce_loss(out_t, memory.n_data)


class CRDHead(nn.Module):
    """The trainable and stateful parts of CRD in one module: ``embed_s``, ``embed_t`` and ``memory``.

    Put its parameters in the optimizer and its ``state_dict()`` (banks and Z included) in the checkpoint.
    """

    def __init__(self, dim_s: int, dim_t: int, n_data: int, dim: int = 128, k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.embed_s, self.embed_t = Embed(dim_s, dim), Embed(dim_t, dim)
        self.memory = ContrastMemory(dim, n_data, k, temperature, momentum, generator)

    def forward(self, fs: torch.Tensor, ft: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, generator: torch.Generator | None = None,
                update: bool = True) -> torch.Tensor:
        """:func:`crd_loss` with this head's modules; a 0-d tensor."""
        return crd_loss(fs, ft, idx, self.embed_s, self.embed_t, self.memory, contrast_idx, generator, update)
