"""Weighted transformed teacher matching (Zheng & Yang 2024, ICLR): TTM with each sample weighed by the power sum.

``L = CE(z, y) + β·mean_b U_γ(q_b)·KL(q̃_b ‖ softmax(z_b))``, ``U_γ(q) = Σ_k q_k^γ`` (the paper's section 4): a
smoother teacher distribution (larger ``U``) weighs more. The loss is :func:`distillistic.methods.ttm.ttm_loss`
with ``weighted=True``. Reference: zkxufo/TTM, ``distiller_zoo/wttm.py``.
"""

from __future__ import annotations

from distillistic.config import Config
from distillistic.core.objective import Term
from distillistic.core.teacher_logits import logit_source
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import Interval, MethodSpec, Param, Setting, at_least, log_uniform
from distillistic.methods.ttm import TTMTerm

_README = ("zkxufo/TTM @fe457b3, README.md lines 35-42 (vgg13 -> vgg8: --add wttm --ttm_l 0.2 -a 4, there beside "
           "CRD at -b 0.8: the one WTTM setting the README gives)")
SPEC = MethodSpec(
    "wttm", "Zheng & Yang 2024, Knowledge Distillation Based on Transformed Teacher Matching (ICLR): WTTM",
    "L = CE(z, y) + β U_γ(q) KL(q^γ / U_γ(q) ‖ softmax(z)), q = softmax(t), U_γ(q) = Σ_k q_k^γ",
    family="teacher", needs_teacher=True, default_teacher="resnet50", composition="sum", weights=("wttm_beta",),
    notes="the paper's appendix A.4 lists T = 1/γ and β per teacher-student pair; the defaults are the WTTM "
          "setting of the authors' README (there combined with CRD)",
    defaults=(
        Setting("wttm_gamma", "appendix A.4: T = 1/γ per teacher-student pair (not transcribed here)",
                f"{_README}: --ttm_l 0.2", "the code's README example (there with CRD)"),
        Setting("wttm_beta", "appendix A.4: β per pair (not transcribed here)", f"{_README}: -a 4",
                "the code's README example (there with CRD)"),
    ),
    params=(
        Param("wttm_gamma", float, 0.2, "exponent gamma of the teacher's power transform (the teacher's T = 1/gamma)",
              cite=f"{_README}: --ttm_l 0.2", range=Interval(0.0, 1.0, open_low=True),
              allowed="an exponent in (0, 1] (1: the teacher as it is)", space=log_uniform(0.05, 1.0)),
        Param("wttm_beta", float, 4.0, "weight beta of the WTTM term", cite=f"{_README}: -a 4",
              range=at_least(0.0), allowed="a weight >= 0", space=log_uniform(0.25, 50.0)),
    ))


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    return (TTMTerm("wttm", logit_source(ctx.teacher, "wttm"), cfg.wttm_gamma, cfg.wttm_beta, weighted=True),)


register_method(SPEC, terms)
