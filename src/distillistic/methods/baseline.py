"""The student trained alone on its labels: the reference every method is compared with."""

from __future__ import annotations

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import MethodSpec

SPEC = MethodSpec("baseline", "supervised training of the student alone", "L = CE(z, y)")


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return ()


register_method(SPEC, terms)
