"""Frozen teachers in real runs: no gradient, unchanged weights, the full view of the same crop, trained once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _util import tiny
from distillistic import train
from distillistic.models.builders import build_model
from distillistic.teachers import cache as teachers
from distillistic.training import engine
from distillistic.training import run as run_mod


def _capture_teacher(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the teacher a run builds and, for each of its forwards, (training mode, grad enabled)."""
    seen: dict[str, Any] = {"calls": []}
    original = teachers.build_teacher

    def build(cfg: Any, info: Any, trainer: Any) -> tuple[nn.Module, str]:
        model, source = original(cfg, info, trainer)
        seen["model"] = model
        model.register_forward_pre_hook(lambda m, args: seen["calls"].append((m.training, torch.is_grad_enabled())))
        return model, source

    monkeypatch.setattr(teachers, "build_teacher", build)
    return seen


@pytest.mark.e2e
def test_no_gradient_reaches_the_teacher_and_its_weights_do_not_change(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("cnn", 10, 1, 8).state_dict(), weights)  # a teacher with BatchNorm statistics
    seen = _capture_teacher(monkeypatch)
    result = train(tiny(tmp_path / "run", algo="kd", model="mlp", teacher="cnn", teacher_weights=str(weights),
                        epochs=2, batch_size=128, allow_weak_teacher=True))  # random weights from a file
    teacher = seen["model"]
    saved = torch.load(weights, weights_only=True)
    for key, value in teacher.state_dict().items():  # weights and BatchNorm buffers alike
        assert torch.equal(value.cpu(), saved[key]), key
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    steps = 2 * (1259 // 128)
    assert len(seen["calls"]) > steps  # every training step, plus the teacher's own evaluation
    assert set(seen["calls"]) == {(False, False)}  # always in eval mode, never recording a graph
    assert result.summary["models"]["teacher"]["source"] == str(weights)
    assert result.summary["models"]["student"]["test"]["top1"] > 0.3  # and the student did learn


def _capture_views(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """For every training step: the full augmented view and what each student and the teacher read."""
    steps: list[dict[str, Any]] = []
    original = engine.train_step
    hooked: set[int] = set()

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if steps and steps[-1]["open"]:
                steps[-1][name] = args[0].detach().clone()
        return hook

    def step(task: Any, batch: Any, alpha: float, meters: Any) -> None:
        members = [*task.students, *([task.teacher] if task.teacher is not None else [])]
        for m in members:
            if id(m.raw) not in hooked:
                m.raw.register_forward_pre_hook(record(m.name))
                hooked.add(id(m.raw))
        # the views are keyed by (data_seed, epoch, index): making them again gives the step's own views
        full = task.views(batch, train=True).get(None, task.students[0].channels)
        plain = task.views(batch, train=False).get(None, task.students[0].channels)
        steps.append({"open": True, "full": full, "plain": plain})
        original(task, batch, alpha, meters)
        steps[-1]["open"] = False

    monkeypatch.setattr(engine, "train_step", step)
    return steps


@pytest.mark.e2e
@pytest.mark.parametrize("algo", ["kd", "dml"])
def test_cross_quality_teacher_reads_the_full_view_students_the_low_view_of_the_same_crop(
        algo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _capture_views(monkeypatch)
    extra: dict[str, Any] = {"teacher": "cnn", "teacher_weights": "random"} if algo == "kd" else {"students": 2}
    train(tiny(tmp_path / "run", algo=algo, dataset="synthetic", image_size=16, student_resolution=8,
               augment="randaugment", batch_size=32, **extra))
    students = ["student"] if algo == "kd" else ["student0", "student1"]
    assert len(steps) == (512 * 7 // 10) // 32
    augmented = 0
    for s in steps:
        full = s["full"]
        low = F.interpolate(full, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        for name in students:
            assert s[name].shape == (32, 1, 8, 8)
            assert torch.equal(s[name], low)
        if algo == "kd":
            assert s["teacher"].shape == (32, 1, 16, 16)
            assert torch.equal(s["teacher"], full)
        else:
            assert "teacher" not in s
        augmented += int((full != s["plain"]).flatten(1).any(1).sum())
    assert augmented > len(steps) * 32 // 2  # the views really were augmented crops, not the raw images


@pytest.mark.e2e
def test_cross_quality_with_a_smaller_teacher_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _capture_views(monkeypatch)
    train(tiny(tmp_path / "run", algo="kd", dataset="synthetic", image_size=16, student_resolution=4,
               teacher_resolution=12, teacher="cnn", teacher_weights="random", batch_size=64))
    for s in steps:
        for size, name in ((12, "teacher"), (4, "student")):
            expected = F.interpolate(s["full"], size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)
            assert torch.equal(s[name], expected)


def _teacher_trainings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the teachers trained first: teachers.py runs them through ``run.train``."""
    trained: list[str] = []
    original = run_mod.train

    def counting(cfg: Any = None, /, **overrides: Any) -> Any:
        trained.append(str(cfg.out))
        return original(cfg, **overrides)

    monkeypatch.setattr(run_mod, "train", counting)
    return trained


@pytest.mark.e2e
def test_a_teacher_trained_once_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _teacher_trainings(monkeypatch)
    cache = tmp_path / "cache"
    common: dict[str, Any] = dict(algo="kd", model="mlp", teacher="cnn", teacher_weights="train", teacher_epochs=1,
                                  cache_dir=str(cache), batch_size=64)
    first = train(tiny(tmp_path / "a", **common))
    assert len(trained) == 1
    folder = Path(trained[0])
    assert folder.parent == cache / "teachers"
    assert folder.name.startswith("cnn-")
    checkpoint = folder / "checkpoints" / "best-student.pt"
    stamp = checkpoint.stat().st_mtime_ns
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    teacher_test = first.summary["models"]["teacher"]["test"]
    assert teacher_test["top1"] > 0.4  # it was trained (10 classes: chance is 0.1)

    # another student (seed, alpha, temperature, architecture) with the same teacher config: reused
    second = train(tiny(tmp_path / "b", **(common | {"seed": 7, "alpha": 0.8, "temperature": 3.0, "model": "cnn"})))
    assert len(trained) == 1
    assert checkpoint.stat().st_mtime_ns == stamp
    assert second.summary["models"]["teacher"]["test"] == teacher_test
    assert second.summary["models"]["teacher"]["source"] == str(folder)

    # a different teacher config trains a new teacher
    train(tiny(tmp_path / "c", **(common | {"teacher_seed": 1})))
    assert len(trained) == 2
    assert Path(trained[1]) != folder
    assert sorted(p.name for p in (cache / "teachers").iterdir() if p.is_dir()) == sorted(
        [folder.name, Path(trained[1]).name])
