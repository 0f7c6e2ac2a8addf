"""Contrastive representation distillation (Tian, Krishnan & Isola 2020, ICLR).

``L = CE(z, y) + β·[NCE(g_s(e_s); bank_t) + NCE(g_t(e_t); bank_s)]`` with ``K`` negatives drawn from momentum
memory banks keyed by the sample's index, τ = 0.07, β = 0.8 [+ ``feature_kd``·T²·KL]. Reference:
HobbitLong/RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``.

``--crd-shared-negatives`` departs from the paper: one draw of ``K`` negatives serves the whole batch (as MoCo's
queue does) instead of ``K`` per sample, so the scores are one ``[B, dim] x [dim, K]`` product instead of a
gather of ``B·(K+1)`` bank rows; each sample's loss is the paper's NCE over those ``K``.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillistic.config import Config
from distillistic.core.features import FeatureTeacher, FeatureTerm, all_gathered
from distillistic.core.objective import Term
from distillistic.core.signals import StepInputs
from distillistic.methods.crd_memory import ContrastMemory
from distillistic.methods.features import parts, weight, with_kd
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import (
    FEATURE,
    FEATURE_KD,
    FEATURE_WEIGHT,
    KD_T_FOR_FEATURES,
    MDISTILLER_CFG,
    REPDISTILLER_SCRIPT,
    Interval,
    MethodSpec,
    Param,
    Setting,
    above,
    at_least,
    choice,
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
                  range=at_least(1), allowed="a whole number > 0"),
            Param("crd_shared_negatives", bool, False, "one draw of negatives for the whole batch (faster; a "
                  "deviation from the paper's per-sample negatives)",
                  cite="Tian et al. 2020, sec. 3.4 and crd/memory.py draw K per sample; shared: He et al. 2020 "
                       "(MoCo)", space=choice(False, True))),
    defaults=(
        Setting("feature_weight", "—",
                f"{REPDISTILLER_SCRIPT}: crd -b 0.8; "
                f"{MDISTILLER_CFG}:143 FEAT_WEIGHT 0.8", ours="0.8"),
        KD_T_FOR_FEATURES,
    ),
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
                 temperature: float = 0.07, momentum: float = 0.5, generator: torch.Generator | None = None,
                 shared: bool = False) -> None:
        super().__init__()
        self.embed_s, self.embed_t = Embed(dim_s, dim), Embed(dim_t, dim)
        self.memory = ContrastMemory(dim, n_data, k, temperature, momentum, generator, shared)

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
                 dim: int, k: int, temperature: float, momentum: float, seed: int, shared: bool = False) -> None:
        super().__init__("crd", teacher, ("embedding",), ("embedding",), weight)
        init = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleList(CRDHead(d, dim_t, n_data, dim, k, temperature, momentum, init, shared)
                                   for d in dim_s)
        self.seed, self.k, self.temperature, self.shared = seed, k, temperature, shared
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
        return f"CRD(e_s, e_t; K={self.k}{' shared' if self.shared else ''}, τ={self.temperature:g})"


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    teacher, probe = parts(ctx, "crd")
    dim_t = probe.shapes("teacher", ("embedding",))["embedding"][1]
    dim_s = [probe.shapes("student", ("embedding",), i)["embedding"][1] for i in range(ctx.students)]
    k = min(cfg.crd_negatives, max(1, probe.n_data - 1))
    if k < cfg.crd_negatives:
        log.info("crd: %d negatives instead of %d (the training split holds %d samples)", k, cfg.crd_negatives,
                 probe.n_data)
    term = Contrastive(teacher, weight(cfg, WEIGHT), dim_s, dim_t, probe.n_data, cfg.crd_dim, k,
                       cfg.crd_temperature, cfg.crd_momentum, cfg.seed, cfg.crd_shared_negatives)
    return with_kd(cfg, ctx, term)


register_method(SPEC, terms)
