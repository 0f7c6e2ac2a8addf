"""Several teachers (KD from their weighted mean) and mixed cohorts, from the Python API, the CLI and a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from _util import run_cli, tiny
from distillistic import config as config_mod
from distillistic import train
from distillistic.config import Config
from distillistic.core.signals import StepInputs, Teacher, Teachers, Teaching
from distillistic.errors import ConfigError, UserError
from distillistic.experiments.report import teacher_rows, write_report
from distillistic.experiments.results import Run
from distillistic.experiments.sweep import run_sweep
from distillistic.runs.export import export_run
from distillistic.training import setup
from distillistic.training.checkpoint import load, read_state_dict
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime

TINY = {"dataset": "digits", "epochs": 1, "batch_size": 128, "lr": 3e-3, "progress": False, "tensorboard": False,
        "num_workers": 0}


# --- the signal ------------------------------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """A "teacher" whose logits are given: row i of ``table`` for sample i."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table[: len(x)]


class _Views:
    def __init__(self, b: int) -> None:
        self.b = b

    def get(self, size: int | None, channels: int) -> torch.Tensor:
        return torch.zeros(self.b, channels, 4, 4)


def _reference(tables: list[np.ndarray], weights: list[float], t: float) -> np.ndarray:
    """float64 ``sum_j w_j softmax(t_j / T)`` with ``w`` normalised to sum 1 (independent of torch)."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out = np.zeros_like(tables[0], dtype=np.float64)
    for wj, tab in zip(w, tables):
        z = tab.astype(np.float64) / t
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out += wj * e / e.sum(axis=1, keepdims=True)
    return out


@pytest.mark.parametrize(("weights", "t"), [((), 4.0), ((0.7, 0.3), 1.0), ((2.0, 0.0), 20.0), ((1.0, 3.0), 2.5)])
def test_teachers_signal_is_the_weighted_mean_of_softened_outputs(weights: tuple[float, ...], t: float) -> None:
    gen = torch.Generator().manual_seed(0)
    tables = [torch.randn(6, 5, generator=gen) * 4 for _ in range(2)]
    models = [_Fixed(tab) for tab in tables]
    members = [Teacher(m, None, 1, key=f"teacher{j}") for j, m in enumerate(models)]
    signal = Teachers(members, weights)
    inp = StepInputs(views=_Views(6), labels=torch.zeros(6, dtype=torch.long), logits=[torch.zeros(6, 5)] * 3,
                     num_classes=5)
    Teaching.of(signal)(inp)  # the step's teaching stage: every teacher's forward, once
    targets = signal.targets(inp, t)
    expected = _reference([tab.numpy() for tab in tables], list(weights) or [1.0, 1.0], t)
    assert len(targets) == 3
    assert all(q is targets[0] for q in targets)
    assert targets[0].shape == (1, 6, 5)
    np.testing.assert_allclose(targets[0][0].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(targets[0][0].sum(dim=1).numpy(), 1.0, rtol=1e-6)
    assert set(inp.teachers) == {"teacher0", "teacher1"}  # each teacher ran once, under its own key
    signal.targets(inp, t)
    assert [m.calls for m in models] == [1, 1]


def test_teachers_signal_refuses_bad_weights() -> None:
    members = [Teacher(_Fixed(torch.zeros(2, 3)), None, 1, key=f"t{j}") for j in range(2)]
    for bad in ((1.0,), (-1.0, 2.0), (0.0, 0.0)):
        with pytest.raises(ValueError, match="one per teacher, >= 0, with a positive sum"):
            Teachers(members, bad)
    with pytest.raises(ValueError, match="at least 2 teachers"):
        Teachers(members[:1])


def test_describe_names_the_mix() -> None:
    members = [Teacher(_Fixed(torch.zeros(2, 3)), None, 1, key=f"t{j}") for j in range(2)]
    assert Teachers(members).describe(4.0) == "mean_(j<2) softmax(t_j/4)"
    assert Teachers(members, (3.0, 1.0)).describe(1.0) == "0.75 softmax(t_0) + 0.25 softmax(t_1)"


# --- config ----------------------------------------------------------------------------------------------


def test_config_lists_coerce_and_round_trip(tmp_path: Path) -> None:
    assert config_mod.coerce("teacher", ["cnn", "mlp"]) == ("cnn", "mlp")
    assert config_mod.coerce("teacher", "cnn,mlp") == ("cnn", "mlp")
    assert config_mod.coerce("teacher_weights", ["train", "/x/run"]) == ("train", "/x/run")
    assert config_mod.coerce("students", "3") == 3
    assert config_mod.coerce("students", 2.0) == 2
    assert config_mod.coerce("students", "cnn,mlp,cnn_wide") == ("cnn", "mlp", "cnn_wide")
    assert config_mod.coerce("students", ["cnn", "mlp"]) == ("cnn", "mlp")
    assert config_mod.coerce("teacher_mix", "0.7,0.3") == (0.7, 0.3)
    with pytest.raises(ConfigError, match="a whole number"):
        config_mod.coerce("students", "2.5")
    cfg = setup.resolve(Config(**TINY, algo="dml", students=("cnn", "mlp", "cnn_wide")))
    path = tmp_path / "config.yaml"
    config_mod.save(cfg, path)
    assert config_mod.load(path) == cfg
    cfg = setup.resolve(Config(**TINY, algo="kd", teacher="cnn,mlp", teacher_weights="train,/a", teacher_mix=(1, 2)))
    config_mod.save(cfg, path)
    assert config_mod.load(path) == cfg
    for n in (3, None):
        config_mod.save(Config(students=n), path)
        assert config_mod.load(path).students == n


# --- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained mlp run directory, the second teacher's PATH."""
    out = tmp_path_factory.mktemp("mlp") / "run"
    train(Config(**TINY, model="mlp", out=str(out), cache_dir=str(out.parent / "cache")))
    return out


def _kd(out: Path | None, path: Path) -> dict[str, Any]:
    return dict(TINY, algo="kd", model="cnn", teacher="cnn_wide,mlp", teacher_weights=f"train,{path}",
                teacher_epochs=1, temperature=4.0, **({"out": str(out)} if out else {}))


def _check_two_teachers(summary: dict[str, Any], path: Path) -> None:
    models = summary["models"]
    assert summary["status"] == "completed"
    assert {"teacher0", "teacher1", "student"} <= set(models)
    assert "teacher" not in models
    assert models["teacher0"]["arch"] == "cnn_wide"
    assert "teachers" in models["teacher0"]["source"]
    assert models["teacher1"]["arch"] == "mlp"
    assert models["teacher1"]["source"] == str(path)
    for name in ("teacher0", "teacher1"):
        assert 0.0 <= models[name]["test"]["top1"] <= 1.0
    assert models["student"]["arch"] == "cnn"
    assert "mean_(j<2) softmax(t_j/4)" in summary["objective"]


@pytest.mark.e2e
def test_two_teachers_from_the_python_api(tmp_path: Path, mlp_teacher: Path) -> None:
    result = train(Config(**_kd(tmp_path / "run", mlp_teacher)))
    _check_two_teachers(result.summary, mlp_teacher)
    # the mlp teacher's evaluation is the one its own run measured (same weights, same test split)
    own = json.loads((mlp_teacher / "summary.json").read_text())["models"]["student"]["test"]["top1"]
    assert result.summary["models"]["teacher1"]["test"]["top1"] == pytest.approx(own, abs=1e-6)
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    identity = ckpt["teacher"]
    assert identity["arch"] == "cnn_wide,mlp"
    assert [t["arch"] for t in identity["teachers"]] == ["cnn_wide", "mlp"]
    assert len({t["sha256"] for t in identity["teachers"]}) == 2
    stores = sorted(p.name.split("-")[0] for p in (Path(config_mod.cache_dir(result.config)) / "teacher-store"
                                                    ).iterdir())
    assert stores == ["cnn_wide", "mlp"]  # one store entry per teacher
    rows = teacher_rows([Run(tmp_path / "run", result.config.to_dict(), result.summary)])
    assert sorted(r["teacher"] for r in rows) == ["cnn_wide", "mlp"]
    # a second run reuses the trained teacher and the store; a resume with another mix is refused
    again = train(Config(**_kd(tmp_path / "again", mlp_teacher)))
    assert again.summary["models"]["teacher0"]["source"] == result.summary["models"]["teacher0"]["source"]
    assert again.summary["models"]["student"]["test"] == result.summary["models"]["student"]["test"]


@pytest.mark.e2e
def test_weighted_teachers_change_the_target_and_the_identity_covers_all(tmp_path: Path, mlp_teacher: Path) -> None:
    cfg = setup.resolve(Config(**_kd(tmp_path / "w", mlp_teacher), teacher_mix=(0.7, 0.3)))
    rt = resolve_runtime(cfg)
    task, extra = build_task(cfg, rt)
    signal = task.objective.extra[0].signal  # type: ignore[attr-defined]
    assert isinstance(signal, Teachers)
    assert signal.weights == pytest.approx([0.7, 0.3])
    assert [m.name for m in task.teachers] == ["teacher0", "teacher1"]
    assert task.teacher is task.teachers[0]
    assert extra.teachers.identity["sha256"] == extra.teachers.sha256
    one = setup.resolve(Config(**TINY, algo="kd", model="cnn", teacher="mlp", teacher_weights=str(mlp_teacher),
                               out=str(tmp_path / "one")))
    task1, extra1 = build_task(one, resolve_runtime(one))
    assert type(task1.objective.extra[0].signal) is Teacher  # type: ignore[attr-defined]
    assert [m.name for m in task1.teachers] == ["teacher"]
    assert set(extra1.teachers.identity) == {"arch", "source", "sha256"}  # the single-teacher identity as before
    assert extra1.teachers.sha256 == extra.teachers.sha256s[1]  # the same weights, the same identity


@pytest.mark.e2e
def test_two_teachers_from_the_cli(tmp_path: Path, mlp_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc, _, err = run_cli(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-progress",
                          "--no-tensorboard", "--num-workers", "0", "--algo", "kd", "--model", "cnn",
                          "--teacher", "cnn_wide,mlp", "--teacher-weights", f"train,{mlp_teacher}",
                          "--teacher-epochs", "1", "--temperature", "4", "--teacher-mix", "0.5,0.5",
                          "--out", str(out)], capsys)
    assert rc == 0, err
    _check_two_teachers(json.loads((out / "summary.json").read_text()), mlp_teacher)


def _sweep(tmp_path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_sweep(path, tmp_path / "sweep")
    assert not result.failures, result.failures
    assert len(result.outcomes) == 1
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]


@pytest.mark.e2e
def test_two_teachers_from_a_sweep(tmp_path: Path, mlp_teacher: Path) -> None:
    spec = _kd(None, mlp_teacher) | {"teacher": ["cnn_wide", "mlp"], "teacher_weights": ["train", str(mlp_teacher)],
                                     "grid": {"alpha": [0.5]}}
    (summary,) = _sweep(tmp_path, spec)
    _check_two_teachers(summary, mlp_teacher)
    report = (write_report([tmp_path / "sweep"]) / "report.md").read_text()
    teachers = report.split("## Teachers")[1]
    assert "| cnn_wide |" in teachers
    assert f"| mlp | `{mlp_teacher}` | 1 |" in teachers


COHORT = ("cnn", "mlp", "cnn_wide")


def _check_cohort(out: Path, summary: dict[str, Any]) -> None:
    models = summary["models"]
    assert summary["status"] == "completed"
    assert [models[f"student{i}"]["arch"] for i in range(3)] == list(COHORT)
    assert {"ensemble"} <= set(models)
    assert "student3" not in models
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["arch"] == {f"student{i}": a for i, a in enumerate(COHORT)}
    assert sum(p.numel() for p in ckpt["models"]["student1"].values()) != sum(
        p.numel() for p in ckpt["models"]["student0"].values())  # really different architectures
    for i, arch in enumerate(COHORT):
        assert load(out / "checkpoints" / f"best-student{i}.pt")["arch"] == {f"student{i}": arch}
    paths = export_run(out)
    archs = {p.stem: read_state_dict(p)[1]["arch"] for p in paths}
    assert archs == {f"student{i}": a for i, a in enumerate(COHORT)}


@pytest.mark.e2e
def test_mixed_cohort_from_the_python_api(tmp_path: Path) -> None:
    out = tmp_path / "dml"
    result = train(Config(**TINY, algo="dml", students=COHORT, out=str(out)))
    _check_cohort(out, result.summary)
    assert config_mod.load(out / "config.yaml").students == COHORT


@pytest.mark.e2e
def test_mixed_cohort_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc, _, err = run_cli(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-progress",
                          "--no-tensorboard", "--num-workers", "0", "--algo", "dml_e",
                          "--students", ",".join(COHORT), "--out", str(out)], capsys)
    assert rc == 0, err
    _check_cohort(out, json.loads((out / "summary.json").read_text()))


@pytest.mark.e2e
def test_mixed_cohort_from_a_sweep(tmp_path: Path) -> None:
    spec = dict(TINY, algo="dml", students=list(COHORT), grid={"seed": [1]})
    (summary,) = _sweep(tmp_path, spec)
    _check_cohort(next((tmp_path / "sweep").glob("seed=1*")), summary)
    report = (write_report([tmp_path / "sweep"]) / "report.md").read_text()
    assert "cohort mean" in report
    assert "## Teachers" not in report


def test_each_teacher_has_its_own_config_and_cached_recipe() -> None:
    from distillistic.teachers.cache import teacher_recipe
    from distillistic.teachers.roster import teacher_configs

    cfg = setup.resolve(Config(**TINY, algo="kd", teacher="cnn,cnn,mlp", teacher_weights="train", teacher_seed=5,
                               teacher_mix=(1, 1, 2)))
    configs = teacher_configs(cfg)
    assert [(c.teacher, c.teacher_weights, c.teacher_seed) for c in configs] == [  # a repeated arch: its own seed
        (("cnn",), ("train",), 5), (("cnn",), ("train",), 6), (("mlp",), ("train",), 5)]
    recipes = [teacher_recipe(c) for c in configs]
    assert len({(r.model, r.seed) for r in recipes}) == 3
    single = setup.resolve(Config(**TINY, algo="kd", teacher="mlp", teacher_seed=5))
    assert teacher_configs(single) == [single]
    assert teacher_recipe(single) == recipes[2]  # the first of an architecture is the single teacher's recipe


def test_an_integer_still_means_copies_of_model() -> None:
    cfg = setup.resolve(Config(**TINY, algo="dml", model="mlp", students=2))
    assert config_mod.student_archs(cfg, 2) == ["mlp", "mlp"]


# --- bad inputs --------------------------------------------------------------------------------------------


@pytest.mark.own_teachers  # checks that nothing was trained before the refusal
@pytest.mark.parametrize(("flags", "message"), [
    (["--algo", "kd", "--teacher", "cnn,mlp", "--teacher-weights", "train,random,train"], "teacher_weights"),
    (["--algo", "kd", "--teacher", "cnn,mlp", "--teacher-mix", "0.2,0.3,0.5"], "teacher_mix"),
    (["--algo", "kd", "--teacher", "cnn,mlp", "--teacher-mix", "1,-1"], "teacher_mix"),
    (["--algo", "kd", "--teacher", "cnn,mlp", "--teacher-mix", "0,0"], "teacher_mix"),
    (["--algo", "dml", "--students", "cnn,resnet1,mlp"], "resnet1"),
    (["--algo", "kd", "--teacher", "cnn,mlp", "--teacher-weights", "train,/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_inputs_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                            message: str) -> None:
    out = tmp_path / "bad"
    rc, _stdout, err = run_cli(["train", "--dataset", "digits", "--epochs", "1", "--no-progress", "--no-tensorboard",
                               "--num-workers", "0", "--out", str(out), *flags], capsys)
    assert rc == 2
    assert len(err) == 1, err
    assert message in err[0]
    assert not (out / "summary.json").exists()
    teachers = config_mod.cache_dir(Config()) / "teachers"
    assert not teachers.exists() or not any(teachers.iterdir())  # nothing trained before the refusal


def test_bad_lists_are_refused_by_the_python_api() -> None:
    with pytest.raises(ConfigError, match="one weight per teacher"):
        setup.resolve(Config(**TINY, algo="kd", teacher="cnn,mlp", teacher_mix=(1.0,)))
    with pytest.raises(ConfigError, match="one entry for all teachers or one per teacher"):
        setup.resolve(Config(**TINY, algo="kd", teacher="cnn,mlp", teacher_weights="train,train,train"))
    with pytest.raises(UserError, match="students"):
        setup.resolve(Config(**TINY, algo="dml", students=("cnn", "nope")))
    with pytest.raises(ConfigError, match="students"):
        setup.resolve(Config(**TINY, algo="dml", students=()))


@pytest.mark.e2e
def test_resume_with_another_second_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpoint's teacher identity covers every teacher: new weights for the second alone are refused."""
    from distillistic.models.builders import build_model

    first, second = tmp_path / "t0.pt", tmp_path / "t1.pt"
    torch.manual_seed(0)
    torch.save(build_model("cnn", 10, 1, 8).state_dict(), first)
    torch.save(build_model("mlp", 10, 1, 8).state_dict(), second)
    out = tmp_path / "run"
    args = ["train", "--algo", "kd", "--teacher", "cnn,mlp", "--teacher-weights", f"{first},{second}",
            "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "128", "--num-workers", "0",
            "--no-tensorboard", "--no-progress", "--allow-weak-teacher", "--out", str(out)]
    rc, _, err = run_cli(args, capsys)
    assert rc == 0, err
    rc, _, err = run_cli([*args, "--resume"], capsys)  # the same teachers: it resumes (and finds it finished)
    assert rc == 0, err
    torch.manual_seed(1)
    torch.save(build_model("mlp", 10, 1, 8).state_dict(), second)  # same path, other weights
    rc, _, err = run_cli([*args, "--resume"], capsys)
    assert rc == 2
    assert "the teacher differs from the one the run started with (cnn,mlp from" in err[0]


@pytest.mark.e2e
def test_a_teacher_path_with_a_comma_is_one_teacher(tmp_path: Path) -> None:
    """A sweep's run directory (``baseline,seed=0``) is one teacher's weights, not two entries; ban in a sweep
    passes its generations that way."""
    first = tmp_path / "sweep" / "baseline,seed=0"
    train(tiny(first, allow_weak_teacher=True))
    cfg = tiny(tmp_path / "kd", algo="kd", teacher="cnn", teacher_weights=str(first), allow_weak_teacher=True)
    assert config_mod.teacher_weights_list(setup.resolve(cfg)) == [str(first)]
    assert train(cfg).summary["status"] == "completed"
