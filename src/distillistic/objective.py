"""The objective: a weighted sum of named terms (DESIGN.md, section 1).

For student ``i`` with logits ``z_i`` ``[B, K]`` and labels ``y`` ``[B]``::

    L_i = (1 - alpha) * CE(z_i, y) + alpha * sum_k w_k * D_k(q_k || z_i; T_k)

Calling an :class:`Objective` returns a dict with ``loss``, ``ce`` and one entry per term (each a
scalar tensor), and ``str(objective)`` prints the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .divergences import DIVERGENCES, SYMBOLS
from .signals import Signal


@dataclass(frozen=True)
class Term:
    """``weight * D(signal || student; T)``; ``name`` keys its value in the returned dict."""

    name: str
    signal: Signal
    divergence: str = "kl"
    temperature: float = 1.0
    weight: float = 1.0

    def describe(self) -> str:
        t = f"{self.temperature:g}"
        d = SYMBOLS.get(self.divergence, self.divergence.upper())
        scale, student = (f"{t}²·", f"softmax(z/{t})") if self.temperature != 1 else ("", "softmax(z)")
        core = f"{scale}{d}({self.signal.describe(self.temperature)} ‖ {student})"
        if self.signal.pairwise:
            core = f"mean_(j≠i) {core}"
        return core if self.weight == 1 else f"{self.weight:g}·{core}"


@dataclass(frozen=True)
class Objective:
    """``(1 - alpha) CE + alpha * sum(terms)``, with alpha optionally warmed up from 0."""

    terms: tuple[Term, ...] = ()
    alpha: float = 0.0
    alpha_warmup: float = 0.0  # share of training over which alpha rises linearly from 0

    def alpha_at(self, progress: float) -> float:
        """alpha after ``progress`` in [0, 1] of training (epochs done / epochs)."""
        if not self.terms:
            return 0.0
        if self.alpha_warmup <= 0:
            return self.alpha
        return self.alpha * min(1.0, progress / self.alpha_warmup)

    @property
    def names(self) -> list[str]:
        return ["loss", "ce", *(t.name for t in self.terms)]

    def __call__(self, logits: Tensor, labels: Tensor, targets: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
        """``logits`` ``[B, K]``, ``labels`` ``[B]``, ``targets[name]`` ``[M, B, K]`` for each term."""
        ce = F.cross_entropy(logits.float(), labels)
        out = {"ce": ce}
        loss = (1 - alpha) * ce if self.terms else ce
        for term in self.terms:
            value = DIVERGENCES.get(term.divergence)(targets[term.name], logits, term.temperature)
            out[term.name] = value
            loss = loss + alpha * term.weight * value
        out["loss"] = loss
        return out

    def __str__(self) -> str:
        if not self.terms:
            return "L = CE(z, y)"
        a, rest = f"{self.alpha:g}", f"{1 - self.alpha:g}"
        distil = " + ".join(t.describe() for t in self.terms)
        warm = f", alpha rising from 0 over the first {self.alpha_warmup:.0%} of training" if self.alpha_warmup else ""
        if len(self.terms) > 1:
            distil = f"[{distil}]"
        return f"L = {rest}·CE(z, y) + {a}·{distil}{warm}"
