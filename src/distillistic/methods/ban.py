"""Born-again networks (Furlanello et al. 2018, ICML): generations of one architecture, each taught by the last.

``ban --generations k`` trains ``k`` runs of the student architecture one after the other:

* generation 1 is trained as the baseline, ``L = CE(z, y)``;
* generation ``g > 1`` is knowledge distillation from generation ``g − 1``'s best-on-val weights (a frozen
  teacher of the same architecture, read from that generation's run directory)::

      L = (1 − a)·CE(z, y) + a·T²·KL(softmax(t_(g−1)/T) ‖ softmax(z/T))

The paper's students learn from the teacher's soft labels at ``T = 1`` (the default here). Generation ``g``
starts from its own initialisation (model seed ``seed + g − 1``) on the same data order (``data_seed``).
The training loop (:mod:`distillistic.training.generations`) writes each generation as a run directory
``<out>/gen<g>`` and evaluates every generation and their ensemble (probability average) on test.
"""

from __future__ import annotations

from distillistic.config import Config, default_of
from distillistic.core.objective import Distill, Term
from distillistic.errors import ConfigError
from distillistic.methods.registry import Context, register_method
from distillistic.methods.spec import MethodSpec, Param, Setting, at_least, int_range

SPEC = MethodSpec(
    "ban", "Furlanello et al. 2018, Born-Again Neural Networks (ICML)",
    "generation 1: L = CE(z, y); generation g: L = (1-a) CE(z, y) + a T² KL(softmax(t_(g-1)/T) ‖ softmax(z/T))",
    family="self", reads=("temperature", "divergence"), generations=True,
    defaults=(Setting("temperature", "Furlanello et al. 2018: the teacher's soft labels at T = 1", "—", ours="1"),),
    params=(Param("generations", int, 3, "born-again generations, each taught by the one before (1: baseline)",
                  cite="Furlanello et al. 2018, table 1 (BAN-1 … BAN-3 and their ensembles)", range=at_least(1),
                  allowed="a whole number of generations > 0", space=int_range(2, 4)),))


def _one_student(cfg: Config) -> None:
    """Each generation is one student: a cohort is refused by the config's checks, before any run or trial."""
    students = len(cfg.students) if isinstance(cfg.students, tuple) else cfg.students
    if students not in (None, 1):
        raise ConfigError("students", cfg.students, "1 for ban (each generation is one student, taught by the "
                                                    "last); drop --students")


def generation_config(cfg: Config, g: int, previous: str | None) -> Config:
    """The config of generation ``g`` (1-based) of a resolved ``ban`` config, taught by run dir ``previous``.

    Generation 1 is a ``baseline`` run; generation ``g > 1`` a ``kd`` run whose teacher is the student
    architecture with ``previous``'s best weights, reading the students' view (same input size).
    """
    common = dict(generations=default_of("generations"), seed=cfg.seed + g - 1, data_seed=cfg.data_seed,
                  teacher_epochs=None)
    if g == 1 or previous is None:
        # the baseline reads no distillation key: they are reset (generation g > 1 reads them again)
        return cfg.replace(algo="baseline", teacher=None, alpha=None, alpha_warmup=default_of("alpha_warmup"),
                           temperature=None, divergence=default_of("divergence"), **common)
    return cfg.replace(algo="kd", teacher=(cfg.model,), teacher_weights=(previous,),
                       teacher_resolution=cfg.student_resolution, **common)


def terms(cfg: Config, ctx: Context) -> tuple[Term, ...]:
    if ctx.teacher is None:  # generation 1, or the objective printed without a teacher
        return ()
    assert cfg.temperature is not None, "resolve the config first"
    return (Distill("ban", ctx.teacher, cfg.divergence, cfg.temperature),)


register_method(SPEC, terms, generations=lambda cfg: cfg.generations, generation=generation_config,
                check_config=_one_student)
