"""CRD's memory banks (Tian, Krishnan & Isola 2020; HobbitLong/RepDistiller ``crd/memory.py``): the student's and
the teacher's embeddings of every training sample, momentum-updated, and the scores of a batch against them over
per-sample or shared negatives. The method itself (its loss, heads, term and spec) is :mod:`distillistic.methods.crd`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distillistic.core.features import full_precision as _full

__all__ = ["ContrastMemory"]


class ContrastMemory(nn.Module):
    """Two memory banks ``[n_data, dim]`` (student and teacher embeddings), keyed by the sample's dataset index.

    Buffers, so that ``state_dict()`` holds them: ``memory_s``, ``memory_t`` (uniform in ``+-1/sqrt(dim/3)`` at
    the start, as the reference) and ``z`` = ``[Z_s, Z_t]``, the NCE normalisation constants, ``-1`` until the
    first forward sets them to ``mean(exp(<v, m>/T)) * n_data`` of that batch (reference ``params[2:4]``).
    Restoring ``state_dict()`` and the generator's state restores the next loss exactly. With ``shared``, one
    draw of ``k`` negatives serves every sample of a batch (:meth:`sample_shared`), not the paper's.

    The bank update (:meth:`update_`) runs inside :meth:`forward`, after this batch was scored against the
    old banks, as RepDistiller's ``ContrastMemory.forward``; ``update=False`` defers it to the caller, who
    must then call ``update_`` once per step (e.g. with the embeddings all-gathered across DDP ranks, since
    each rank otherwise writes only its own samples).
    """

    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor

    def __init__(self, dim: int, n_data: int, k: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None, shared: bool = False) -> None:
        super().__init__()
        if n_data < 1 or k < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"ContrastMemory: bad n_data={n_data}, k={k}, temperature={temperature} or "
                             f"momentum={momentum}")
        self.n_data, self.k, self.temperature, self.momentum = n_data, k, temperature, momentum
        self.shared = shared
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

    def sample_shared(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``K`` negatives ``[K]`` for the whole batch: uniform over the dataset with replacement (one row of
        :meth:`sample`'s draw, shared by every sample; it may hold a sample's own index, as there)."""
        device = generator.device if generator is not None else self.memory_s.device
        return torch.randint(0, self.n_data, (self.k,), generator=generator, device=device).to(self.memory_s.device)

    def _scores(self, bank: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor | None,
                negatives: torch.Tensor | None) -> torch.Tensor:
        """``exp(<m_j, v_b> / T)`` ``[B, K+1]``, column 0 the positive ``m_idx``: over the rows ``contrast_idx``
        ``[B, K+1]`` of each sample (a gather of ``B·(K+1)`` rows), or over ``negatives`` ``[K]`` shared by the
        batch (one ``[B, dim] x [dim, K]`` product)."""
        v = _full(v)
        if negatives is None:
            assert contrast_idx is not None
            dots = torch.bmm(bank[contrast_idx].to(v.dtype), v.unsqueeze(2)).squeeze(2)  # no grad: a buffer
        else:
            positive = (bank[idx].to(v.dtype) * v).sum(1, keepdim=True)
            dots = torch.cat([positive, v @ bank[negatives].to(v.dtype).T], dim=1)
        return torch.exp(dots / self.temperature)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: torch.Tensor | None = None, generator: torch.Generator | None = None,
                update: bool = True, negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``P(i | v) = exp(<m_i, v> / T) / Z`` for the ``K + 1`` sampled indices, ``([B, K+1], [B, K+1])``.

        ``out_s``: the student embedding ``v_s`` ``[B, dim]`` against the teacher bank; ``out_t``: the teacher
        embedding against the student bank (reference ``out_v1``, ``out_v2``). Computed in float32 at least,
        outside autocast: ``exp(1 / 0.07) = 1.6e6`` overflows fp16. The negatives: ``contrast_idx`` ``[B, K+1]``
        (each sample's), else ``negatives`` ``[K]`` (the batch's), else drawn (:meth:`sample_shared` when the
        memory is ``shared``, :meth:`sample` otherwise).
        """
        if contrast_idx is None and negatives is None:
            if self.shared:
                negatives = self.sample_shared(generator)
            else:
                contrast_idx = self.sample(idx, generator)
        with torch.autocast(device_type=v_s.device.type, enabled=False):
            outs = [self._scores(bank, v, idx, contrast_idx, negatives)
                    for bank, v in ((self.memory_t, v_s), (self.memory_s, v_t))]
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
