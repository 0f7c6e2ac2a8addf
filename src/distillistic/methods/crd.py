"""Contrastive representation distillation (Tian, Krishnan & Isola 2020, ICLR).

``L = CE(z, y) + β·[NCE(g_s(e_s); bank_t) + NCE(g_t(e_t); bank_s)]`` with ``K`` negatives drawn from momentum
memory banks keyed by the sample's index, τ = 0.07, β = 0.8 [+ ``feature_kd``·T²·KL]. Reference:
HobbitLong/RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, all_gathered
from distillistic.core.features import full_precision as _full
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.methods.features import parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    Interval,
    MethodSpec,
    Param,
    above,
    at_least,
    int_range,
    log_uniform,
    uniform,
)

log = logging.getLogger("distillistic")
WEIGHT = 0.8  # RepDistiller's train_student.py: -b 0.8 for crd
_CRD = "HobbitLong/RepDistiller, train_student.py"
SPEC = MethodSpec(
    "crd", "Tian, Krishnan & Isola 2020, Contrastive Representation Distillation (ICLR)",
    "L = CE(z, y) + β [NCE(g_s(e_s); bank_t) + NCE(g_t(e_t); bank_s)], K negatives, τ = 0.07 (β = 0.8) [+ w T² KL]",
    params=(FEATURE_WEIGHT, FEATURE_KD,
            Param("crd_negatives", int, 16384, "negatives per sample (at most the training samples - 1)",
                  cite=f"{_CRD}: --nce_k 16384", range=at_least(1), allowed="a whole number > 0",
                  space=int_range(256, 16384)),
            Param("crd_temperature", float, 0.07, "temperature of the NCE scores", cite=f"{_CRD}: --nce_t 0.07",
                  range=above(0.0), space=log_uniform(0.03, 0.3)),
            Param("crd_momentum", float, 0.5, "momentum of the memory bank's update", cite=f"{_CRD}: --nce_m 0.5",
                  range=Interval(0.0, 1.0, open_high=True), space=uniform(0.0, 0.9)),
            Param("crd_dim", int, 128, "dimension of the embedding heads", cite=f"{_CRD}: --feat_dim 128",
                  range=at_least(1), allowed="a whole number > 0")),
    **FEATURE)

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


class Contrastive(FeatureTerm):
    """CRD (Tian et al. 2020): NCE over ``K`` negatives of a momentum memory bank keyed by the sample's index.

    One :class:`CRDHead` per student (its two embeddings train with the student; its banks and normalisers are
    buffers). The banks update after the optimizer step with the embeddings of every DDP rank, so that all
    ranks keep equal banks (RepDistiller updates inside the forward: the same values in one process).
    Negatives are drawn from a ``torch.Generator`` seeded with ``seed``, whose state is this term's
    extra state in the checkpoint, so a resumed run draws the same negatives.
    """

    def __init__(self, teacher: FeatureTeacher, weight: float, dim_s: Sequence[int], dim_t: int, n_data: int,
                 dim: int, k: int, temperature: float, momentum: float, seed: int) -> None:
        super().__init__("crd", teacher, ("embedding",), ("embedding",), weight)
        init = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleList(CRDHead(d, dim_t, n_data, dim, k, temperature, momentum, init) for d in dim_s)
        self.seed, self.k, self.temperature = seed, k, temperature
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None  # a restored generator state, applied when the generator is made
        self._updates: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # student -> (idx, v_s, v_t) of this step

    def _draws(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        """:func:`crd_loss` against the banks as they were before this step; the banks update in :meth:`after_step`."""
        assert inp.index is not None, "CRD needs the samples' dataset indices"
        (fs,), (ft,) = self.maps(i, inp)
        idx = inp.index.to(fs.device, non_blocking=True)
        head = typing.cast(CRDHead, self.heads[i])
        v_s, v_t = head.embed_s(fs), head.embed_t(ft.detach())
        out_s, out_t = head.memory(v_s, v_t, idx, generator=self._draws(fs.device), update=False)
        self._updates[i] = (idx, v_s.detach(), v_t.detach())
        return nce_loss(out_s, head.memory.n_data) + nce_loss(out_t, head.memory.n_data)

    def after_step(self, inp: StepInputs) -> None:
        """The momentum update of every student's banks with this step's embeddings, of every DDP rank."""
        for i, update in sorted(self._updates.items()):
            typing.cast(CRDHead, self.heads[i]).memory.update_(*all_gathered(update))
        self._updates.clear()

    def student_parameters(self, i: int) -> Iterator[nn.Parameter]:
        return self.heads[i].parameters()

    def get_extra_state(self) -> Any:
        state = self._generator.get_state() if self._generator is not None else self._pending
        return {"generator": state}

    def set_extra_state(self, state: Any) -> None:
        self._generator, self._pending = None, state.get("generator")

    def describe(self) -> str:
        return f"CRD(e_s, e_t; K={self.k}, τ={self.temperature:g})"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "crd")
    dim_t = probe.shapes("teacher", ("embedding",))["embedding"][1]
    dim_s = [probe.shapes("student", ("embedding",), i)["embedding"][1] for i in range(ctx.students)]
    k = min(cfg.crd_negatives, max(1, probe.n_data - 1))
    if k < cfg.crd_negatives:
        log.info("crd: %d negatives instead of %d (the training split holds %d samples)", k, cfg.crd_negatives,
                 probe.n_data)
    term = Contrastive(teacher, weight(cfg, WEIGHT), dim_s, dim_t, probe.n_data, cfg.crd_dim, k,
                       cfg.crd_temperature, cfg.crd_momentum, cfg.seed)
    return with_kd(cfg, ctx, term)


register_method(SPEC, terms)
