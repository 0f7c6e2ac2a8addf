"""Calibrated teaching signals: temperature scaling of the frozen teacher, and settings derived from a baseline.

* ``--teacher-calibration temperature`` (Guo et al. 2017; Menon et al. 2021 and Kim et al. 2025 on why a
  calibrated teacher teaches better): before distillation, one ``T_cal = argmin_T NLL(softmax(t / T), y)`` is
  fitted on the **val** split by LBFGS (:func:`~distillistic.core.calibration.fit_temperature`) from the teacher's
  raw logits; the signal then uses ``t / T_cal`` everywhere (``softmax(t / (T_cal T))`` at KD temperature T), its
  evaluation included. ``T_cal`` is part of the teacher-output store's key and of ``summary.json``.
* Settings a method derives from another run (its parameters' ``derived_from``), filled in when the run starts
  by the method's ``derive`` hook, with the students' baseline trained once and cached as a teacher is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from distillistic.config import Config
from distillistic.core.calibration import fit_temperature
from distillistic.core.precision import at_least_float32
from distillistic.core.signals import StepInputs, Teacher, model_view
from distillistic.data.loader import Loader, build_data
from distillistic.data.views import ViewMaker
from distillistic.errors import ConfigError
from distillistic.methods.registry import METHODS
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


class CachedRuns:
    """The other runs a method derives settings from (:class:`~distillistic.methods.registry.Runs`): the students'
    baseline is trained once with ``train`` and cached as a teacher is (:func:`trained_teacher_dir`:
    ``teacher_seed``, ``teacher_init``, this run's epochs and recipe)."""

    def __init__(self, train: Trainer) -> None:
        self.train = train

    def baseline(self, cfg: Config) -> Path:
        own = cfg.replace(teacher=(cfg.model,), teacher_resolution=cfg.student_resolution, teacher_epochs=cfg.epochs)
        return trained_teacher_dir(own, build_data(cfg).info, self.train)

    def summary(self, folder: Path) -> dict[str, Any]:
        return read_summary(folder) if folder.is_dir() else {}


def derive_settings(cfg: Config, train: Trainer) -> Config:
    """``cfg`` with what its method takes from other runs filled in (unchanged for a method that takes nothing)."""
    method = METHODS.get(cfg.algo)
    return method.derive(cfg, CachedRuns(train)) if method.derive is not None else cfg
