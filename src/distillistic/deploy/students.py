"""A run's students (and EMA copies, and every generation of ``ban``) rebuilt as :class:`Preprocessed` modules.

The architecture and weights come from the run's checkpoints (or a ``.safetensors`` export), what the
student reads from the run's ``manifest.json`` (size, channels, statistics, class names) or, at export, from
the data itself. ``distillistic.load_student(path)`` is the public entry point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillistic import config as config_mod
from distillistic.config import Config
from distillistic.deploy.graph import Inputs, Preprocessed
from distillistic.errors import CheckpointError, UserError
from distillistic.methods.registry import METHODS
from distillistic.models.builders import MODELS, build_model
from distillistic.models.stages import stage_modules
from distillistic.runs.export import run_checkpoints
from distillistic.training.checkpoint import check_format, load, load_weights, read_safetensors
from distillistic.training.plugins import load_plugins


@dataclass
class Student:
    """One exportable model of a run: ``folder`` is ``""`` or a generation's (``gen2``)."""

    name: str
    arch: str
    folder: str
    module: Preprocessed
    epoch: int | None
    config: dict[str, Any]


def read_manifest_data(folder: Path) -> dict[str, Any]:
    """The ``dataset`` entry of a run's ``manifest.json`` (``{}`` when missing or unreadable)."""
    try:
        data = json.loads((folder / "manifest.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def inputs_for(cfg: Config, arch: str, data: Mapping[str, Any]) -> Inputs:
    """What ``arch`` reads in a run of ``cfg`` on data described by ``data`` (a manifest's dataset entry)."""
    missing = [k for k in ("image_size", "channels", "mean", "std") if k not in data]
    if missing:
        raise CheckpointError(f"the run's manifest.json does not record the input {missing[0]} (a run made "
                              "before it did); export it with the data present, or train it again")
    spec = MODELS.get(arch)
    files = data.get("source") == "files" if "source" in data else cfg.dataset == "imagefolder"
    return Inputs(int(data["image_size"]), int(data["channels"]), tuple(data["mean"]), tuple(data["std"]),
                  cfg.student_resolution, spec.channels(int(data["channels"])), spec.norm, files)


def build_student(arch: str, cfg: Config, state: Mapping[str, torch.Tensor], data: Mapping[str, Any],
                  num_classes: int, source: str) -> Preprocessed:
    """The student ``arch`` with ``state`` loaded (strictly), behind its input pipeline, in eval mode on CPU."""
    load_plugins(cfg)  # a module:function model of the user's
    inputs = inputs_for(cfg, arch, data)
    model = build_model(arch, num_classes, inputs.channels, inputs.view_size or inputs.image_size)
    model = _as_trained(cfg, arch, model, state)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, source, arch)
    names = data.get("class_names") or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise CheckpointError(f"'{source}' has {num_classes} outputs but its run names {len(names)} classes")
    return Preprocessed(model, inputs, tuple(map(str, names))).eval()


def _as_trained(cfg: Config, arch: str, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The student as its method trained it: the plain ``model``, or the method's own module around it (e.g. a
    projector and a reused teacher classifier), rebuilt by the method from the saved ``state``."""
    rebuild = METHODS.get(cfg.algo).rebuild_student if cfg.algo in METHODS else None
    return rebuild(cfg, model, state, lambda: stage_modules(arch, model)) if rebuild is not None else model


def _config(raw: Any, source: Path) -> Config:
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{source}' does not record its run's config; export it from a distillistic run")
    return config_mod.from_mapping(raw)


def run_students(run_dir: Path, which: str = "best", data: Mapping[str, Mapping[str, Any]] | None = None,
                 command: str = "export") -> list[Student]:
    """Every student of ``run_dir`` (EMA copies and generations too); ``data``: folder -> dataset facts that
    replace the manifest's (what the data itself says, at export)."""
    students = []
    for folder, path in run_checkpoints(run_dir, which, command):
        ckpt = load(path)
        check_format(ckpt, path)
        models, arch = ckpt.get("models"), ckpt.get("arch")
        if not isinstance(models, dict) or not models or not isinstance(arch, dict):
            raise CheckpointError(f"{command}: checkpoint '{path}' holds no model weights; it is damaged")
        cfg = _config(ckpt.get("config"), path)
        facts = (data or {}).get(folder) or read_manifest_data(run_dir / folder)
        epoch = ckpt["epoch"] if "epoch" in ckpt else (ckpt.get("progress") or {}).get("epoch")
        for name, state in models.items():
            module = build_student(arch[name], cfg, state, facts, int(ckpt["num_classes"]), str(path))
            students.append(Student(name, arch[name], folder, module, epoch, ckpt["config"]))
    return students


def load_student(path: str | Path, name: str | None = None) -> Preprocessed:
    """A student as an ``nn.Module`` taking uint8 images ``[B, C, H, W]`` (``.class_names`` name its outputs).

    ``path``: a ``.safetensors`` file of ``distillistic export``, or a run directory (its best student, or the
    model ``name``: ``student1``, ``student0_ema``; ``gen3/student`` for a generation of ``ban``).
    """
    path = Path(path)
    if path.is_dir():
        students = run_students(path, command="load_student")
        if name is None:
            return _best(path, students).module
        for s in students:
            if name in (s.name, f"{s.folder}/{s.name}"):
                return s.module
        raise UserError(f"load_student: '{path}' has no model '{name}'; it has "
                        f"{', '.join(f'{s.folder}/{s.name}'.lstrip('/') for s in students)}")
    if path.suffix != ".safetensors":
        raise UserError(f"load_student: '{path}' is neither a run directory nor a .safetensors export "
                        "(an .onnx file runs with onnxruntime, or with 'distillistic predict')")
    state, meta = read_safetensors(path)
    if not meta.get("arch") or not meta.get("num_classes"):
        raise CheckpointError(f"'{path}' is not an export of distillistic (no arch in its metadata)")
    facts = meta.get("inputs") or {}
    return build_student(meta["arch"], _config(meta.get("config"), path), state, facts, int(meta["num_classes"]),
                         str(path))


def _best(run_dir: Path, students: list[Student]) -> Student:
    """The run's best student by ``summary.json`` (``best_student`` of a cohort; the last generation)."""
    last = [s for s in students if s.folder == students[-1].folder and not s.name.endswith("_ema")]
    try:
        best = json.loads((run_dir / students[-1].folder / "summary.json").read_text()).get("best_student")
    except (OSError, ValueError, AttributeError):
        best = None
    return next((s for s in last if s.name == best), last[0] if last else students[0])
