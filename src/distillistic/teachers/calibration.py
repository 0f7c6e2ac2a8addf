"""Calibrated teaching signals: temperature scaling of the frozen teacher, and Tf-KD's p from a baseline.

* ``--teacher-calibration temperature`` (Guo et al. 2017; Menon et al. 2021 and Kim et al. 2025 on why a
  calibrated teacher teaches better): before distillation, one ``T_cal = argmin_T NLL(softmax(t / T), y)`` is
  fitted on the **val** split by LBFGS (:func:`~distillistic.core.calibration.fit_temperature`) from the teacher's
  raw logits; the signal then uses ``t / T_cal`` everywhere (``softmax(t / (T_cal T))`` at KD temperature T), its
  evaluation included. ``T_cal`` is part of the teacher-output store's key and of ``summary.json``.
* ``--virtual-p-from RUN_DIR|auto`` (the issue's ``--virtual-p auto``): Tf-KD's virtual teacher takes ``p`` = a
  baseline run's best val top-1, so the hand-made teacher is as confident as a trained model is accurate; ``auto``
  trains (once, cached like a teacher) the baseline of the student's architecture. It is resolved when the run
  starts, and the saved config holds the value used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.core.calibration import fit_temperature
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, Teacher, model_view
from distillistic.data.loader import Loader, build_data
from distillistic.data.views import ViewMaker
from distillistic.errors import ConfigError, UserError
from distillistic.runs.rundir import read_summary
from distillistic.teachers.cache import Trainer, trained_teacher_dir
from distillistic.training.runtime import Runtime

log = logging.getLogger("distillistic")


@torch.no_grad()
def fit_teacher_temperature(teacher: Teacher, loader: Loader, views: ViewMaker, num_classes: int,
                            rt: Runtime) -> float:
    """``T_cal`` of the teacher's raw logits on the val split (every process's shard gathered, so all agree)."""
    teacher.model.eval()
    logits, labels = [], []
    for batch in loader.epoch(0):
        y = batch.labels.to(rt.device)
        inp = StepInputs(views(batch, train=False), y, [], num_classes, 0, batch.index, "val")
        with rt.autocast():
            z = teacher.model(model_view(inp.views, teacher.view_size, teacher.channels, teacher.norm))
            logits.append(at_least_float32(z))
        labels.append(y)
    z = rt.all_gather_rows(torch.cat(logits).double() if logits else torch.zeros(0, num_classes,
                                                                                   device=rt.device))
    y_all = rt.all_gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=rt.device))
    if int(torch.unique(y_all).numel()) < 2:
        raise ConfigError("teacher_calibration", "temperature",
                          "none: the val split holds fewer than 2 classes to fit the teacher's temperature on "
                          "(or use a larger --val-fraction)")
    return fit_temperature(z, y_all)


def calibrate_teachers(signals: list[Teacher], names: list[str], loader: Loader, views: ViewMaker,
                       num_classes: int, rt: Runtime) -> dict[str, float]:
    """Fit and set every teacher's ``calibration_t`` (each its own, on its raw logits); name -> T_cal."""
    fitted = {}
    for name, signal in zip(names, signals, strict=True):
        signal.calibration_t = fitted[name] = fit_teacher_temperature(signal, loader, views, num_classes, rt)
        log.info("teacher calibration: %s temperature %.4f fitted on val", name, signal.calibration_t)
    return fitted


# Keys a run derives from another run when their source key is set: its config.yaml holds the derived value, a
# sweep's plan the unset one (the run derives it again when resumed, and its resume check compares them).
DERIVED_KEYS = {"virtual_p": "virtual_p_from"}


def resolve_virtual_p(cfg: Config, train: Trainer) -> Config:
    """``cfg`` with ``virtual_p`` = the best val top-1 of the baseline run ``virtual_p_from`` (unchanged if unset).

    ``auto``: the baseline of the student's own architecture, trained once with ``train`` and cached as a
    teacher is (:func:`~distillistic.teachers.cache.trained_teacher_dir`: ``teacher_seed``, ``teacher_init``,
    this run's epochs and recipe)."""
    if cfg.virtual_p_from is None:
        return cfg
    if cfg.virtual_p_from == "auto":
        baseline = cfg.replace(teacher=(cfg.model,), teacher_resolution=cfg.student_resolution,
                               teacher_epochs=cfg.epochs)
        folder = trained_teacher_dir(baseline, build_data(cfg).info, train)
    else:
        folder = Path(cfg.virtual_p_from).expanduser()
    summary = read_summary(folder) if folder.is_dir() else {}
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
    if given not in (float(top1), config_mod.default_of("virtual_p")):  # the derived p would silently replace it
        raise UserError(f"--virtual-p {given} and --virtual-p-from '{folder}' (p = {float(top1):.6g}) both set p; "
                        "give one of them")
    return cfg.replace(virtual_p=float(top1))
