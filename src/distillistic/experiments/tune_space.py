"""What ``distillistic tune`` searches for each method: its parameters' spaces plus the common keys it reads.

A method's own parameters are tuned where their :class:`~distillistic.methods.spec.Param` has a ``space``
(``distillistic list algos`` shows them); the common keys are the learning rate and the weight decay (every
method), and the distillation weight α and the temperature T where the method reads them
(:meth:`~distillistic.methods.spec.MethodSpec.keys_read`). A key the user sets (a flag, the config file,
``--set``) is fixed at that value and not searched. No torch, no Optuna here: :func:`suggest` takes the trial.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from typing import Any

from distillistic.errors import UserError
from distillistic.methods import catalogue
from distillistic.methods.spec import MethodSpec, Space, log_uniform, uniform

# The common keys' spaces. The learning rate and weight decay bracket the optimizer's defaults (AdamW: lr 1e-3,
# decay 0.01; SGD: lr 0.1 is the usual start, decay 1e-4) by a factor 10 each way; α spans [0, 1] (0: the
# student alone, so a tune can find that distillation does not help); T spans the field's values, 1 (DML) to
# 20 (the thesis's KD).
COMMON_SPACES: dict[str, dict[str, Space]] = {
    "adamw": {"lr": log_uniform(1e-4, 1e-2), "weight_decay": log_uniform(1e-3, 1e-1)},
    "sgd": {"lr": log_uniform(1e-2, 1.0), "weight_decay": log_uniform(1e-5, 1e-3)},
}
DISTILL_SPACES: dict[str, Space] = {"alpha": uniform(0.0, 1.0), "temperature": log_uniform(1.0, 20.0)}


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``, or one line naming the known ones."""
    specs = catalogue.specs()
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"tune: unknown algorithm '{name}'{hint}; choose from {', '.join(specs)} "
                        "('distillistic list algos' describes them)")
    return specs[name]


def search_space(spec: MethodSpec, optimizer: str, fixed: Collection[str]) -> dict[str, Space]:
    """The keys tuned for ``spec`` and their spaces: its parameters with a space, then the common keys it reads,
    less the ``fixed`` keys the user set; refuses a method left with nothing to tune, or a malformed space."""
    space = {p.name: p.space for p in spec.params if p.space is not None}
    space |= COMMON_SPACES.get(optimizer, COMMON_SPACES["adamw"])
    read = spec.keys_read()
    space |= {k: s for k, s in DISTILL_SPACES.items() if k in read}
    space = {k: s for k, s in space.items() if k not in fixed}
    if not space:
        given = ", ".join(sorted(k for k in fixed if k in read or k in ("lr", "weight_decay")))
        raise UserError(f"tune: method '{spec.name}' has nothing left to tune (no parameter with a search space; "
                        f"the common keys it reads are fixed by your flags: {given or 'none'}); drop a fixed flag "
                        "or leave the method out of --algo")
    for key, s in space.items():
        check_space(spec.name, key, s)
    return space


def check_space(method: str, key: str, space: Space) -> None:
    """Refuse an empty or malformed space (``low >= high``, a log scale through 0, no choices)."""
    if space.choices:
        return
    low, high = space.low, space.high
    why = None
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        why = "needs finite low and high bounds, or choices"
    elif low >= high:
        why = f"is empty (low {low:g} >= high {high:g})"
    elif space.scale == "log" and low <= 0:
        why = f"is on a log scale, so its low bound must be > 0 (not {low:g})"
    if why:
        raise UserError(f"tune: method '{method}': the search space of '{key}' {why}; fix the parameter's space")


def suggest(trial: Any, space: Mapping[str, Space]) -> dict[str, Any]:
    """One value per key, drawn by the Optuna ``trial`` from its space."""
    values: dict[str, Any] = {}
    for key, s in space.items():
        low, high, log = float(s.low or 0.0), float(s.high or 0.0), s.scale == "log"  # checked by check_space
        if s.choices:
            values[key] = trial.suggest_categorical(key, list(s.choices))
        elif s.integer:
            values[key] = trial.suggest_int(key, int(low), int(high), log=log)
        else:
            values[key] = trial.suggest_float(key, low, high, log=log)
    return values


def describe(space: Mapping[str, Space]) -> dict[str, str]:
    """Each key's space in words: ``log-uniform [0.0001, 0.01]``, ``one of false, true``."""
    out = {}
    for key, s in space.items():
        if s.choices:
            out[key] = "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in s.choices)
        else:
            kind = ("integers" if s.integer else "uniform") if s.scale == "linear" else \
                ("log integers" if s.integer else "log-uniform")
            out[key] = f"{kind} [{s.low:g}, {s.high:g}]"
    return out
