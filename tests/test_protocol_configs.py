"""The published protocols as ready sweep configs: they expand into the intended cells, and one cell of each
runs for one epoch on a small subset on the CPU (shrunk with --set overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _cifar_files import write_cifar
from _util import run_cli
from conftest import IMAGENET_SAMPLE
from distillistic import config as config_mod
from distillistic.experiments.grid import expand

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS_NOW = {"baseline", "kd", "dml", "dml_e", "tfkd"}  # every method registered when the configs were written
PAIRS = {("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("vgg13", "vgg8"),
         ("resnet32x4", "shufflenetv2")}
SMALL = ["--set", "epochs=1", "--set", "teacher_epochs=1", "--set", "num_workers=0", "--set", "tensorboard=false",
         "--set", "threads=1"]


def test_cifar100_benchmark_expands_into_pairs_x_methods_x_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    plan = expand(config_mod.read_yaml(CONFIGS / "cifar100_kd_benchmark.yaml"), source="cifar")  # validates each
    cells = [c.config for c in plan.cells]
    assert len(cells) == len(PAIRS) * len(METHODS_NOW) * 3
    assert {c.algo for c in cells} == METHODS_NOW
    assert {c.seed for c in cells} == {0, 1, 2}
    kd = [c for c in cells if c.algo == "kd"]
    assert {(c.teacher_arch, c.model) for c in kd} == PAIRS
    assert {(c.temperature, c.alpha, c.teacher_weights) for c in kd} == {(4.0, 0.9, ("train",))}
    for c in cells:  # the protocol itself
        assert (c.dataset, c.epochs, c.batch_size, c.optimizer, c.momentum, c.weight_decay) == (
            "cifar100", 240, 64, "sgd", 0.9, 5e-4)
        assert (c.scheduler, c.milestones, c.gamma, c.warmup_fraction, c.augment) == (
            "multistep", (150, 180, 210), 0.1, 0.0, "cifar")
        assert c.lr == (0.01 if c.model == "shufflenetv2" else 0.05)
    students = {(c.model, c.algo) for c in cells}
    assert students == {(s, m) for _, s in PAIRS for m in METHODS_NOW}  # every method for every student
    rc, out, err = run_cli(["sweep", str(CONFIGS / "cifar100_kd_benchmark.yaml"), "--out", "unused", "--dry-run"],
                           capsys)
    assert rc == 0, err
    assert len(out.splitlines()) == 75
    assert "r32x4_r8x4_kd,seed=0" in out.splitlines()[1]


def test_imagenet_r34_r18_expands_into_torchdistills_protocol() -> None:
    plan = expand(config_mod.read_yaml(CONFIGS / "imagenet_r34_r18.yaml"), source="imagenet")
    cells = [c.config for c in plan.cells]
    assert {c.algo for c in cells} == METHODS_NOW
    assert len(cells) == len(METHODS_NOW)
    for c in cells:
        assert (c.model, c.epochs, c.batch_size, c.optimizer, c.lr, c.weight_decay, c.milestones) == (
            "resnet18", 100, 256, "sgd", 0.1, 1e-4, (30, 60, 90))
    kd = next(c for c in cells if c.algo == "kd")
    assert (kd.teacher, kd.teacher_weights, kd.temperature, kd.alpha) == (("resnet34",), ("imagenet",), 1.0, 0.5)


def _summary(out: Path) -> dict[str, object]:
    found = list(out.rglob("summary.json"))
    assert len(found) == 1, found
    return dict(json.loads(found[0].read_text()))


def _config(out: Path) -> dict[str, object]:
    found = list(out.rglob("config.yaml"))
    assert len(found) == 1, found
    return dict(yaml.safe_load(found[0].read_text()))


@pytest.mark.e2e
def test_one_cifar_cell_runs_one_epoch_on_400_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """resnet56 -> resnet20 KD (cell 11; teacher trained first), 400 CIFAR-format training images (of 800 in the
    files), shrunk to 8 px."""
    root = write_cifar(tmp_path / "data", "cifar100", per_class=8, test_per_class=2)
    rc, _, err = run_cli(["sweep", str(CONFIGS / "cifar100_kd_benchmark.yaml"), "--out", str(tmp_path / "sweep"),
                          "--shard", "11/75", "--set", f"data_root={root}", "--set", "max_train_samples=400",
                          "--set", "image_size=8", "--set", "allow_weak_teacher=true", *SMALL], capsys)
    assert rc == 0, err
    summary = _summary(tmp_path / "sweep")
    assert summary["status"] == "completed"
    cfg = _config(tmp_path / "sweep")
    assert (cfg["algo"], cfg["model"], cfg["teacher"], cfg["max_train_samples"]) == ("kd", "resnet20", "resnet56", 400)


@pytest.mark.e2e
@pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason="../shared/datasets/imagenet-sample100 is not present")
def test_one_imagenet_cell_runs_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline cell (ResNet-18, SGD, multistep) on the 100-image sample at 32 px."""
    rc, _, err = run_cli(["sweep", str(CONFIGS / "imagenet_r34_r18.yaml"), "--out", str(tmp_path / "sweep"),
                          "--shard", "0/5", "--set", f"data_root={IMAGENET_SAMPLE}", "--set", "image_size=32",
                          "--set", "batch_size=16", "--set", "max_train_samples=2000", *SMALL], capsys)
    assert rc == 0, err
    summary = _summary(tmp_path / "sweep")
    assert summary["status"] == "completed"
