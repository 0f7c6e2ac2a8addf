"""Teacher-free KD (Yuan et al. 2020, Revisiting Knowledge Distillation via Label Smoothing Regularization).

* ``tfkd`` (the virtual teacher, Tf-KD_reg): ``L = (1 − α)·CE(z, y) + α·KL(v ‖ softmax(z))`` with ``v`` = ``p`` on
  the true class and ``(1 − p)/(K − 1)`` elsewhere; ``--virtual-smooth`` is the original code's loss: the target
  softened to ``softmax(v/T)`` (T = 20), the student at T = 1, the KL's 'mean' reduction (over ``B·K``), no ``T²``.
  ``--virtual-p-from RUN|auto`` takes ``p`` from a baseline's best val top-1, so the hand-made teacher is as
  confident as a trained model is accurate; ``auto`` trains (once, cached like a teacher) the baseline of the
  student's architecture. It is resolved when the run starts, and the saved config holds the value used.
* ``tfkd_self`` (self-training, Tf-KD_self): KD from the student's own architecture trained first, ``T = 20``.
  Each student of a cohort is taught by its own architecture, so a cohort of several architectures is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from distillistic.config import Config, default_of, student_archs
from distillistic.core.divergences import DIVERGENCES, SYMBOLS
from distillistic.core.logits import Transform
from distillistic.core.objective import Distill, Term
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, soft
from distillistic.errors import ConfigError, UserError
from distillistic.methods.registry import Context, Runs, register_method, student_count
from distillistic.methods.spec import Interval, MethodSpec, Param, Setting, choice, uniform

_SMOOTH = ("yuanli2333/Teacher-free-Knowledge-Distillation@d000ab3, my_loss_function.py:33-51 "
           "(loss_kd_regularization: nn.KLDivLoss() of log_softmax(outputs) and softmax(teacher_soft/T))")
_PAPER = "Yuan et al. 2020, Revisiting Knowledge Distillation via Label Smoothing Regularization (CVPR)"
SPEC = MethodSpec(
    "tfkd", f"{_PAPER}: virtual teacher",
    "L = (1-a) CE(z, y) + a KL(v ‖ softmax(z)), v = p on y, (1-p)/(K-1) elsewhere (smoothed: softmax(v/T))",
    family="self", reads=("temperature", "divergence"),
    defaults=(
        Setting("virtual_p", "Yuan et al. 2020, sec. 4: a = 0.9",
                "my_loss_function.py:39: correct_prob = 0.99 (fixed in the code)",
                "the paper's 0.9 (the code's 0.99 with --virtual-p 0.99)"),
        Setting("virtual_smooth", "Yuan et al. 2020: KL of the softened virtual teacher and the softened student",
                "my_loss_function.py:47: KLDivLoss() ('mean') of log_softmax(z) and softmax(v/T), × multiplier",
                "off: the calibrated v at T = 1 (the thesis); on: the code's loss exactly"),
        Setting("temperature", "—",
                "experiments/base_experiments/base_resnet18/params.json: reg_temperature 20 (40 for MobileNetV2)",
                ours="1; 20 with --virtual-smooth"),
        Setting("alpha", "Yuan et al. 2020: (1 − α)·CE + α·KL",
                "base_resnet18/params.json: reg_alpha 0.1, multiplier 100 (0.95 and 1 for MobileNetV2)",
                "the thesis's α = 0.5 (the code's per-model α and multiplier are not one default)", ours="0.5"),
    ),
    params=(
        Param("virtual_p", float, 0.9, "probability of the correct class in the virtual teacher, in (1/K, 1]",
              cite="Yuan et al. 2020, sec. 4 (a = 0.9 in their Tf-KD_reg runs)", space=uniform(0.5, 0.99),
              range=Interval(0.0, 1.0, open_low=True), allowed="a probability in (1/K, 1]",
              derived_from="virtual_p_from"),
        Param("virtual_smooth", bool, False, "the original code's loss: KL(softmax(v/T) ‖ softmax(z)) / K, the "
              "student at T = 1", cite=_SMOOTH,
              space=choice(False, True)),
        Param("virtual_p_from", str, None, "take --virtual-p from a baseline RUN_DIR's best val top-1, or auto: "
              "from the student's baseline, trained once and cached", optional=True),
    ))
SPEC_SELF = MethodSpec(
    "tfkd_self", f"{_PAPER}: self-training",
    "L = (1-a) CE(z, y) + a T² KL(softmax(t/T) ‖ softmax(z/T)), t: the student's architecture trained first",
    family="self", needs_teacher=True, temperature=20.0, reads=("temperature", "divergence"),
    defaults=(Setting("temperature", "—",
                      "my_loss_function.py:19-30: loss_kd_self (T from params.json)", ours="20"),
              Setting("alpha", "Yuan et al. 2020: (1 − α)·CE + α·KD", "loss_kd_self: (1 − α)·CE + α·T²·KL·multiplier, "
                      "KLDivLoss() 'mean' over B·K", "Hinton's batch mean (the code's element mean is 1/K of it); "
                      "the thesis's α = 0.5", ours="0.5")))


class Virtual:
    """Tf-KD's hand-made teacher: ``p`` on the true class, ``(1 - p) / (K - 1)`` on every other."""

    pairwise = False
    of_logits = False  # made from the labels: nothing to standardise

    def __init__(self, p: float, smooth: bool, name: str = "tfkd") -> None:
        self.p, self.smooth, self.name = p, smooth, name

    def distribution(self, labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``v`` ``[B, K]`` in ``dtype``, vectorised over the batch."""
        v = torch.full((len(labels), num_classes), (1 - self.p) / (num_classes - 1), device=labels.device,
                       dtype=dtype)
        return v.scatter_(1, labels[:, None], self.p)

    def targets(self, inp: StepInputs, temperature: float, transform: Transform = None) -> list[Tensor]:
        if transform is not None:
            raise ValueError("the virtual teacher is made of probabilities, not logits: it cannot be standardised")
        v = self.distribution(inp.labels, inp.num_classes, at_least_float32(inp.logits[0]).dtype)
        if self.smooth:
            v = torch.softmax(v / temperature, dim=-1)
        return [v.unsqueeze(0)] * len(inp.logits)

    def describe(self, temperature: float) -> str:
        v = f"v(p={self.p:g})"
        return soft(v, temperature) if self.smooth else v


def _virtual_p_check(cfg: Config, num_classes: int) -> None:
    if not 1.0 / num_classes < cfg.virtual_p <= 1.0:
        raise ConfigError("virtual_p", cfg.virtual_p,
                          f"a probability in (1/K, 1] = ({1.0 / num_classes:.4g}, 1] for K = {num_classes} classes")


class VirtualSmooth(Term):
    """Tf-KD_reg as the original code computes it (``loss_kd_regularization``, :data:`_SMOOTH`):
    ``D(softmax(v/T) ‖ softmax(z)) / K``: the target softened at ``T``, the student's logits at ``T = 1``, and
    ``nn.KLDivLoss()``'s default 'mean' reduction, over the ``B·K`` elements (so a ``1/K`` on the batch mean),
    without ``T²``. The code's per-model ``multiplier`` (1 to 100) is left to the weight α."""

    def __init__(self, p: float, temperature: float, divergence: str = "kl", name: str = "tfkd") -> None:
        super().__init__(name, 1.0, distil=True)
        self.virtual, self.temperature, self.divergence = Virtual(p, smooth=True, name=name), temperature, divergence
        self._fn = DIVERGENCES.get(divergence)

    def targets(self, inp: StepInputs) -> list[Tensor]:
        return self.virtual.targets(inp, self.temperature)

    def loss(self, i: int, z: Tensor, inp: StepInputs, target: Tensor | None) -> Tensor:
        assert target is not None
        return self._fn(target, z, 1.0) / z.shape[-1]

    def describe(self) -> str:
        d = SYMBOLS.get(self.divergence, self.divergence.upper())
        return f"{d}({self.virtual.describe(self.temperature)} ‖ softmax(z))/K"


def terms_virtual(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert cfg.temperature is not None, "resolve the config first"
    if cfg.virtual_smooth:
        return (VirtualSmooth(cfg.virtual_p, cfg.temperature, cfg.divergence),)
    return (Distill("tfkd", Virtual(cfg.virtual_p, False, name="tfkd"), cfg.divergence, cfg.temperature),)


def own_architecture(cfg: Config) -> str:
    """The architecture the students share (a self-trained cohort of several architectures is refused)."""
    archs = sorted(set(student_archs(cfg, student_count(cfg) or 1)))
    if len(archs) > 1:
        raise UserError(f"tfkd_self teaches each student by its own architecture, but the students are "
                        f"{', '.join(archs)} and one run has one teacher; run tfkd_self once per architecture, "
                        "or use --algo kd")
    return archs[0]


def _own_teacher(cfg: Config) -> None:
    """Self-training's teacher is the students' own architecture: another one would silently make this KD."""
    own = own_architecture(cfg)
    if cfg.teacher is not None and cfg.teacher != (own,):
        raise UserError(f"tfkd_self is taught by the student's own architecture ('{own}'), not by "
                        f"'{','.join(cfg.teacher)}'; "
                        f"leave --teacher out (or set it to {own}), or use --algo kd")


def terms_self(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    assert ctx.teacher is not None, "resolve the config first"
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("tfkd_self", ctx.teacher, cfg.divergence, cfg.temperature),)


def derive_virtual_p(cfg: Config, runs: Runs) -> Config:
    """``cfg`` with ``virtual_p`` = the best val top-1 of the baseline run ``virtual_p_from`` (unchanged if unset);
    ``auto``: the baseline of the student's own architecture (:meth:`Runs.baseline`)."""
    if cfg.virtual_p_from is None:
        return cfg
    folder = runs.baseline(cfg) if cfg.virtual_p_from == "auto" else Path(cfg.virtual_p_from).expanduser()
    summary = runs.summary(folder)
    if summary.get("status") != "completed":
        raise UserError(f"--virtual-p-from '{folder}' is not a finished run directory (no completed summary.json); "
                        "pass the folder of a finished 'distillistic train --algo baseline' run")
    models = summary.get("models") or {}
    name = summary.get("best_student") or next((n for n in models if n.startswith("student")), None)
    top1 = ((models.get(name) or {}).get("val_best") or {}).get("top1") if name else None
    if not isinstance(top1, int | float) or not 0.0 < top1 <= 1.0:
        raise UserError(f"--virtual-p-from '{folder}': its summary.json has no val top-1 of a student; "
                        "pass a finished run of 'distillistic train'")
    if summary.get("dataset") not in (None, cfg.dataset):
        raise UserError(f"--virtual-p-from '{folder}' was trained on {summary.get('dataset')}, not {cfg.dataset}; "
                        "pass a baseline run on the same dataset")
    given = cfg.virtual_p
    if given not in (float(top1), default_of("virtual_p")):  # the derived p would silently replace it
        raise UserError(f"--virtual-p {given} and --virtual-p-from '{folder}' (p = {float(top1):.6g}) both set p; "
                        "give one of them")
    return cfg.replace(virtual_p=float(top1))


register_method(SPEC, terms_virtual, data_check=_virtual_p_check, derive=derive_virtual_p,
                temperature=lambda cfg: 20.0 if cfg.virtual_smooth else 1.0)
register_method(SPEC_SELF, terms_self, check_config=_own_teacher,
                resolve_teacher=lambda cfg: own_architecture(cfg))
