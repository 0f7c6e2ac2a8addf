"""Knowledge distillation (Hinton, Vinyals & Dean 2015): the student matches the teacher's softened outputs.

``L = (1 − α)·CE(z, y) + α·T²·KL(softmax(t/T) ‖ softmax(z/T))``; with several teachers (``--teacher a,b``) the
target is their (weighted, ``--teacher-mix``) mean ``Σ_j w_j softmax(t_j/T)``. ``--divergence`` replaces the KL
(JS, MSE); ``--logit-standardize`` z-scores ``t`` and ``z`` per sample first (Sun et al. 2024), at its authors'
weights ``0.1·CE + 9·KD`` and base temperature 2 unless ``--alpha`` or ``--temperature`` is set.
"""

from __future__ import annotations

from distillistic.config import Config
from distillistic.core.objective import Distill, Term
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import LOGIT_STANDARDIZE, MethodSpec, Setting

SPEC = MethodSpec(
    "kd", "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network",
    "L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)); several teachers: their mean softmax(t_j/T)",
    family="teacher", needs_teacher=True, default_teacher="resnet50", temperature=20.0,
    params=(LOGIT_STANDARDIZE,), reads=("temperature", "divergence"),
    defaults=(
        Setting("temperature", "Hinton et al. 2015, sec. 3: T = 20 on MNIST (no single T)",
                "megvii-research/mdistiller@a08d46f, mdistiller/engine/cfg.py:61: 4 (CIFAR-100)",
                "the thesis's T = 20 (its MNIST/ImageNet runs); --temperature 4 for mdistiller's CIFAR setting",
                ours="20; 2 with --logit-standardize"),
        Setting("alpha", "Hinton et al. 2015, sec. 2: a weighted average of the two terms",
                "mdistiller/engine/cfg.py:63-64: CE 0.1, KD 0.9",
                "the thesis's α = 0.5; --alpha 0.9 for mdistiller's", ours="0.5"),
        Setting("logit_standardize", "—",
                "sunshangquan/logit-standardization-KD@f6e5aa5, tools/train.py:102-114 and "
                "mdistiller/engine/cfg.py:64: CE 0.1, KD 9, T 2",
                "the authors': 0.1·CE + 9·KD at T = 2 unless --alpha or --temperature is set"),
    ),
    notes="T = 20 and alpha = 0.5: the thesis's setting (Hinton et al. give no single T); with --logit-standardize "
          "0.1·CE + 9·KD at T = 2, the authors' (logit-standardization-KD, mdistiller/engine/cfg.py:62-65, "
          "tools/train.py:103-114)")
# Logit standardisation's own setting (sunshangquan/logit-standardization-KD@f6e5aa5): CE weight 0.1 and KD
# weight 9 (mdistiller/engine/cfg.py:64, tools/train.py:104), base temperature 2 (tools/train.py:103).
LS_WEIGHTS, LS_TEMPERATURE = (0.1, 9.0), 2.0


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert ctx.teacher is not None, "resolve the config first"
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("kd", ctx.teacher, cfg.divergence, cfg.temperature, standardize=cfg.logit_standardize),)


register_method(SPEC, terms, authors_weights=lambda cfg: LS_WEIGHTS if cfg.logit_standardize else None,
                temperature=lambda cfg: LS_TEMPERATURE if cfg.logit_standardize else SPEC.temperature)
