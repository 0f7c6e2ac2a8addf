"""The first hour: a run that talks, help that reads, your own model and data, a teacher checked
before it teaches, reports that keep the user's names, threads that fit the machine."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import _forked_cli as forked_cli
from _util import run_cli, tiny
from distillistic.cli import build_parser
from distillistic.config import FIELDS
from distillistic.config.keys_help import groups as config_groups
from distillistic.teachers.check import chance_threshold
from distillistic.training import cores

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--model", "cnn", "--epochs", "1", "--batch-size", "64", "--lr", "3e-3",
        "--no-tensorboard", "--num-workers", "0", "--no-progress"]


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python -m distillistic ARGS`` in ``cwd``, stderr to a file (not a terminal), as a user would: a process
    of its own, forked from a server that imported torch once (tests/_forked_cli.py)."""
    return forked_cli.run(args, env=forked_cli.cli_env(DISTILLISTIC_CACHE=str(cwd / "cache")), timeout=timeout,
                          cwd=cwd)


@pytest.mark.multiprocess
def test_kd_run_talks_to_a_file_and_quiet_silences_it(tmp_path: Path) -> None:
    kd = [*TINY, "--algo", "kd", "--teacher", "cnn", "--teacher-epochs", "2"]
    done = _cli(["train", *kd, "--out", "kd", "--line-every", "5"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    start = [line for line in lines if line.startswith("start: kd")]
    assert start
    for part in ("device cpu", "precision fp32", "threads", "world size 1"):
        assert part in start[0]
    assert any(line.startswith("teacher: start: baseline") for line in lines)  # the nested run, prefixed
    teacher_epochs = [line for line in lines if line.startswith("teacher: epoch ") and " cnn: " in line]
    assert not [line for line in lines if line.startswith("teacher:") and "student" in line]  # it says teacher
    assert any(line.startswith("teacher: ETA ") for line in lines)  # an ETA before its first epoch ends
    # the student's ETA: its early line, or (a run of under 3 s and 20 steps has none) its first epoch's line
    assert any(line.startswith("ETA ") or (line.startswith("epoch ") and " ETA " in line) for line in lines)
    assert [line.split()[2] for line in teacher_epochs] == ["1/2", "2/2"]
    student = [line for line in lines if line.startswith("epoch 1/1 student: ")]
    assert len(student) == 1
    for word in ("loss", "val top1", "ece", "lr", "img/s", "ETA"):
        assert word in student[0]
    assert any(line.startswith("teacher: epoch 1/2 step 5/") for line in lines)  # the interval lines
    assert any("teacher cnn (train): val top1" in line and "chance" in line for line in lines)
    assert any(line.startswith("teacher store: filling (epoch 1: ") for line in lines)  # the first run fills it
    # --quiet: the same run again (teacher cached, store warm) prints no progress line
    done = _cli(["train", *kd, "--out", "kd2", "--quiet"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith(("start:", "epoch ", "teacher"))], \
        done.stderr


def test_help_is_grouped_with_examples_and_one_default_each(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert text.index("examples:") < text.index("what to run:")
    for title in ("what to run:", "data:", "models:", "distillation:", "optimisation:", "runtime:", "output:"):
        assert f"\n{title}\n" in text
    groups = config_groups()
    assert sum(len(v) for v in groups.values()) == len(FIELDS)  # every key lands in a group
    assert "plugins" in groups["models"]
    assert "quiet" in groups["output"]
    assert "epochs" in groups["optimisation"]
    chunks = text.split("\n  --")[1:]
    for chunk in chunks:
        body = " ".join(chunk.split())
        if body.startswith(("set ", "no-teacher-store", "help")):
            continue
        assert body.count("(default") == 1, body
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("distillistic ")


def test_help_does_not_import_torch() -> None:
    code = "import sys, distillistic.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "False"


PLUGIN = '''
import torch
from torch import nn

from distillistic import register_model


class Blobs(torch.utils.data.Dataset):
    """3 classes of 6x6 grey images whose brightness is the class (float in [0, 1])."""

    classes = ["dark", "mid", "bright"]

    def __init__(self, n=240):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = (self.y.float()[:, None, None] / 3 + 0.1 * torch.rand(n, 6, 6, generator=g)).clamp(0, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load(root):
    return Blobs()


def build_net(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


register_model("tiny_linear", lambda k, c, s: nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, k)))
'''


@pytest.mark.multiprocess
def test_plugin_model_and_dataset_train_through_cli_and_sweep(tmp_path: Path) -> None:
    (tmp_path / "my_models.py").write_text(PLUGIN)
    args = ["--model", "my_models:build_net", "--dataset", "my_models:load", "--epochs", "3", "--batch-size", "32",
            "--lr", "0.05", "--no-tensorboard", "--no-progress", "--num-workers", "0"]
    done = _cli(["train", *args, "--out", "run"], tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["models"]["student"]["test"]["top1"] > 0.6  # brightness is easy: it learned
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["dataset"]["image_size"], manifest["dataset"]["num_classes"]) == (6, 3)
    sweep = {"plugins": ["my_models"], "dataset": "my_models:load", "epochs": 1, "batch_size": 32, "num_workers": 0,
             "tensorboard": False, "progress": False,
             "variants": {"linear": {"model": "tiny_linear"}, "mine": {"model": "my_models:build_net"}},
             "grid": {"seed": [0, 1]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    done = _cli(["sweep", "sweep.yaml", "--out", "sw"], tmp_path)
    assert done.returncode == 0, done.stderr
    done = _cli(["report", "sw"], tmp_path)
    assert done.returncode == 0, done.stderr
    with (tmp_path / "sw" / "report" / "results.csv").open() as f:
        labels = sorted({row["label"] for row in csv.DictReader(f)})
    assert labels == ["linear", "mine"]  # the variants' own names label the cells


@pytest.mark.multiprocess
def test_a_bad_plugin_is_one_line(tmp_path: Path) -> None:
    done = _cli(["train", *TINY, "--plugins", "no_such_module_xyz", "--out", "x"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no_such_module_xyz" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.multiprocess
def test_chance_level_teacher_is_refused_before_training(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.models.builders import build_model

    torch.manual_seed(0)
    torch.save(build_model("cnn", 10, 1, 8).state_dict(), tmp_path / "untrained.pt")
    kd = [*TINY, "--algo", "kd", "--teacher", "cnn", "--teacher-weights", "untrained.pt"]
    done = _cli(["train", *kd, "--out", "kd"], tmp_path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "chance level" in last
    assert "--allow-weak-teacher" in last
    assert not (tmp_path / "kd" / "checkpoints").exists()  # refused before training
    # random weights asked for explicitly stay allowed, as does the override (the same CLI, in this process)
    weights = str(tmp_path / "untrained.pt")
    assert run_cli(["train", *kd[:-1], "random", "--out", str(tmp_path / "kd_random")], capsys)[0] == 0
    assert run_cli(["train", *kd[:-1], weights, "--allow-weak-teacher", "--out", str(tmp_path / "kd_weak")],
                   capsys)[0] == 0


@pytest.mark.multiprocess
def test_teacher_recorded_for_other_data_is_refused(tmp_path: Path) -> None:
    from distillistic import train

    train(tiny(tmp_path / "synth", dataset="synthetic", synthetic_classes=10, image_size=8))  # TINY, on synthetic
    done = _cli(["train", *TINY, "--algo", "kd", "--teacher", "cnn", "--teacher-weights", "synth", "--out", "kd"],
                tmp_path)
    assert done.returncode == 2
    assert "trained on 'synthetic'" in done.stderr.strip().splitlines()[-1]


def test_chance_threshold_is_a_binomial_bound() -> None:
    labels = torch.arange(100) % 4  # p = 1/4, n = 100: 0.25 + 3 * sqrt(0.1875 / 100) = 0.3799
    chance, threshold = chance_threshold(labels, 4)
    assert chance == pytest.approx(0.25)
    assert threshold == pytest.approx(0.25 + 3 * (0.25 * 0.75 / 100) ** 0.5)


@pytest.mark.e2e
def test_demo_report_has_no_teacher_cell_and_uses_its_names(tmp_path: Path) -> None:
    from distillistic.experiments.demo import run_demo
    from distillistic.experiments.report import write_report

    small = {"max_train_samples": 300, "teacher": "cnn", "teacher_epochs": 1, "allow_weak_teacher": True}
    table = run_demo(str(tmp_path / "demo"), seeds=1, epochs=1, algos=["kd", "dml"], settings=small)
    assert "dml (cohort mean)" in table
    assert "dml (ensemble)" in table
    assert (tmp_path / "demo" / "cache" / "teachers").is_dir()  # the teacher was trained into the demo folder
    teacher = json.loads(next((tmp_path / "demo" / "kd").rglob("summary.json")).read_text())["models"]["teacher"]
    assert f"test top-1 {100 * teacher['test']['top1']:.2f} %" in table  # the table says how strong it was
    out = write_report([tmp_path / "demo"])
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted({(r["label"], r["model"]) for r in rows}) == [
        ("dml", "cohort mean"), ("dml", "ensemble"), ("kd", "student")]
    assert all("teachers" not in r["runs"] for r in rows)


def test_threads_follow_affinity_quota_and_parallel_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cores.cgroup_quota(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.cgroup_quota(tmp_path) is None
    monkeypatch.setattr(cores, "_affinity", lambda: 8)
    monkeypatch.setattr(cores, "cgroup_quota", lambda root=None: 3.5)
    assert cores.available_cores() == 4
    monkeypatch.setenv(cores.RUNS_ENV, "3")
    assert cores.default_threads() == 1
    assert cores.default_threads(runs=2) == 2


def test_interval_lines_read_the_loss_only_at_their_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Every ``line_every`` steps: one line and one per-step TensorBoard record with the mean loss of the
    steps since the last line (not of the whole epoch); nothing in between."""
    from types import SimpleNamespace

    from distillistic.runs.talk import Talk
    from distillistic.training.engine import Progress

    class Inner:
        def __init__(self) -> None:
            self.logged: list[tuple[int, dict[str, float]]] = []

        def after_step(self, *args: object) -> bool:
            return False

        def log_step(self, step: int, values: dict[str, float]) -> None:
            self.logged.append((step, values))

    cfg = SimpleNamespace(line_every=2, line_seconds=0.0, epochs=1)
    opt = SimpleNamespace(param_groups=[{"lr": 0.1}])
    task = SimpleNamespace(cfg=cfg, show_progress=False, students=[object()], optimizers=[opt], teacher=None,
                           loaders={"train": [0] * 6})
    meters = SimpleNamespace(losses=torch.zeros(1, 1, dtype=torch.float64), extra=torch.zeros(3, dtype=torch.float64))
    inner, progress = Inner(), Progress()
    talk = Talk(inner, task, progress, show=True)  # type: ignore[arg-type]
    caplog.set_level("INFO", logger="distillistic")
    for step, loss in enumerate([1.0, 3.0, 5.0, 7.0, 9.0], 1):
        meters.losses += loss
        meters.extra[0] += 1
        progress.step = progress.global_step = step
        progress.epoch_images += 10
        assert talk.after_step(task, progress, meters) is False  # type: ignore[arg-type]
    assert [(s, v["loss"], v["lr"]) for s, v in inner.logged] == [(2, 2.0, 0.1), (4, 6.0, 0.1)]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1 step 2/6", "epoch 1/1 step 4/6"]
    assert "loss 2.0000" in lines[0]
    assert "loss 6.0000" in lines[1]


def test_demo_says_when_its_teacher_is_no_better_than_the_student_alone(tmp_path: Path) -> None:
    """The demo's last line says how strong the teacher was, and plainly when KD has nothing to add."""
    from distillistic.experiments.demo import _teacher_line

    def run(name: str, models: dict[str, float]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        summary = {"status": "completed", "models": {m: {"test": {"top1": v}} for m, v in models.items()}}
        (folder / "summary.json").write_text(json.dumps(summary))
        return folder

    base = [run("b0", {"student": 0.99}), run("b1", {"student": 0.97})]
    kd = [run("k0", {"student": 0.96, "teacher": 0.97}), run("k1", {"student": 0.96, "teacher": 0.98})]
    line = _teacher_line({"baseline": base, "kd": kd})
    assert "test top-1 97.50 ± 0.71 % over 2 runs" in line
    assert "no better than the student trained alone (98.00 %)" in line
    stronger = [run("k2", {"student": 0.96, "teacher": 0.995})]
    assert "no better" not in _teacher_line({"baseline": base, "kd": stronger})
