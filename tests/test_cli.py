"""The command line: every bad input of issues 2 and 3 gives one line, exit code 2, and loses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from _util import balanced_labels, run_cli, snapshot, tiny, write_idx, write_idx_split
from distillistic import train
from distillistic.data.loader import DATASETS
from distillistic.methods.registry import METHODS
from distillistic.models.builders import MODELS, build_model

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64", "--no-progress",
        "--no-tensorboard", "--num-workers", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run to protect, damaged data folders and mismatched teacher checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"root": root, "cache": root / "cache"}
    paths["run"] = root / "existing-run"
    train(tiny(paths["run"], model="mlp", cache_dir=str(paths["cache"])))
    labels = balanced_labels(3)

    def folder(name: str) -> Path:
        paths[name] = root / name
        paths[name].mkdir()
        return paths[name]

    folder("no-idx").joinpath("notes.txt").write_text("no IDX files here")
    images, _ = write_idx_split(folder("corrupt-gz"), "t10k", labels)
    images.write_bytes(b"not gzip at all")
    images, _ = write_idx_split(folder("truncated-gz"), "t10k", labels)
    images.write_bytes(images.read_bytes()[:-40])
    images, _ = write_idx_split(folder("truncated-idx"), "t10k", labels, gz=False)
    images.write_bytes(images.read_bytes()[:-5])
    images, _ = write_idx_split(folder("bad-magic"), "t10k", labels, gz=False)
    images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
    for name in ("cat", "dog"):
        (folder("no-images") if name == "cat" else paths["no-images"]).joinpath(name).mkdir()
    torch.manual_seed(0)
    torch.save(build_model("cnn", 5, 1, 8).state_dict(), root / "cnn-5-classes.pt")
    torch.save(build_model("mlp", 10, 1, 8).state_dict(), root / "mlp-10-classes.pt")
    return paths


def _args(world: dict[str, Path], *extra: str) -> list[str]:
    return [*BASE, "--out", str(world["run"]), "--overwrite", "--cache-dir", str(world["cache"]), *extra]


CASES: dict[str, tuple[list[str], list[str]]] = {
    # id: (arguments, substrings of the one error line); "{name}" is replaced by the world's paths
    "unknown dataset": (["--dataset", "imagenett"], ["unknown dataset 'imagenett'", *DATASETS.names()]),
    "unknown model": (["--model", "resnet9"], ["unknown model 'resnet9'", "cnn", "mlp", "resnet18"]),
    "unknown algo": (["--algo", "dmll"], ["unknown algorithm 'dmll'", "did you mean 'dml'", *METHODS.names()]),
    "unknown teacher": (["--algo", "kd", "--teacher", "vit_h"], ["config key 'teacher'", "unknown model 'vit_h'"]),
    "unknown key": (["--set", "alpah=0.3"], ["unknown config key 'alpah'", "did you mean 'alpha'"]),
    "missing data folder": (["--dataset", "mnist", "--data-root", "{root}/nowhere"],
                            ["data folder '{root}/nowhere' does not exist"]),
    "folder without IDX": (["--dataset", "mnist", "--data-root", "{no-idx}"], ["no IDX files in '{no-idx}'"]),
    "corrupt gzip": (["--dataset", "mnist", "--data-root", "{corrupt-gz}"],
                     ["t10k-images-idx3-ubyte.gz' is not a readable gzip file"]),
    "truncated gzip": (["--dataset", "mnist", "--data-root", "{truncated-gz}"], ["corrupt or truncated"]),
    "truncated IDX": (["--dataset", "mnist", "--data-root", "{truncated-idx}"],
                      ["t10k-images-idx3-ubyte' is truncated"]),
    "bad magic": (["--dataset", "mnist", "--data-root", "{bad-magic}"], ["bad magic number"]),
    "image folder without images": (["--dataset", "imagefolder", "--data-root", "{no-images}", "--image-size", "16"],
                                    ["no images in the class folders of '{no-images}'"]),
    "zero epochs": (["--epochs", "0"], ["'epochs' = 0", "> 0"]),
    "negative epochs": (["--epochs", "-3"], ["'epochs' = -3"]),
    "fractional epochs": (["--epochs", "1.5"], ["'epochs'", "a whole number"]),
    "zero batch size": (["--batch-size", "0"], ["'batch_size' = 0"]),
    "zero lr": (["--lr", "0"], ["'lr' = 0.0", "> 0"]),
    "negative lr": (["--lr", "-0.001"], ["'lr' = -0.001"]),
    "negative lr in exponent form": (["--lr=-1e-3"], ["'lr' = -0.001"]),
    "text lr": (["--lr", "fast"], ["'lr' = 'fast'", "a number"]),
    "one dml student": (["--algo", "dml", "--students", "1"], ["'students' = 1", "at least 2 for dml"]),
    "one dml_e student": (["--algo", "dml_e", "--students", "1"], ["at least 2 for dml_e"]),
    "alpha below 0": (["--algo", "tfkd", "--alpha", "-0.1"], ["'alpha' = -0.1", "[0, 1]"]),
    "alpha above 1": (["--algo", "kd", "--alpha", "1.5"], ["'alpha' = 1.5"]),
    "alpha for a sum composition": (["--algo", "dist", "--teacher", "mlp", "--teacher-weights", "random", "--alpha",
                                     "0.5"], ["config key 'alpha' is not used by algo dist", "dist_beta, dist_gamma"]),
    "zero temperature": (["--algo", "kd", "--temperature", "0"], ["'temperature' = 0.0", "a number in [0.01, 1000]"]),
    "negative temperature": (["--algo", "dml", "--temperature", "-2"], ["'temperature' = -2.0"]),
    "virtual p = 1/K": (["--algo", "tfkd", "--virtual-p", "0.1"], ["'virtual_p' = 0.1", "(0.1, 1]", "K = 10"]),
    "virtual p below 1/K": (["--algo", "tfkd", "--virtual-p", "0.05"], ["'virtual_p' = 0.05"]),
    "virtual p above 1": (["--algo", "tfkd", "--virtual-p", "1.5"], ["'virtual_p' = 1.5"]),
    "student resolution too large": (["--algo", "kd", "--teacher", "mlp", "--teacher-weights", "random",
                                      "--student-resolution", "16"],
                                     ["'student_resolution' = 16", "at most the input size 8 px"]),
    "teacher resolution too large": (["--algo", "kd", "--teacher", "mlp", "--teacher-weights", "random",
                                      "--teacher-resolution", "9"], ["'teacher_resolution' = 9"]),
    "teacher with wrong class count": (["--algo", "kd", "--teacher", "cnn", "--teacher-weights",
                                        "{root}/cnn-5-classes.pt"],
                                       ["cnn-5-classes.pt' has a 5-class head but the dataset has 10 classes"]),
    "teacher with wrong architecture": (["--algo", "kd", "--teacher", "cnn", "--teacher-weights",
                                         "{root}/mlp-10-classes.pt"],
                                        ["mlp-10-classes.pt' does not fit architecture 'cnn'"]),
    "teacher run of another architecture": (["--algo", "kd", "--teacher", "cnn", "--teacher-weights", "{run}"],
                                            ["are a mlp but --teacher is cnn", "--teacher mlp"]),
    "missing teacher weights": (["--algo", "kd", "--teacher", "cnn", "--teacher-weights", "{root}/none.pt"],
                                ["teacher weights '{root}/none.pt' not found"]),
    "imagenet teacher on 10 classes": (["--algo", "kd", "--teacher", "resnet18", "--teacher-weights", "imagenet"],
                                       ["1000-class head", "--teacher-init imagenet"]),
}


def _fill(text: str, world: dict[str, Path]) -> str:
    for name, path in world.items():
        text = text.replace("{" + name + "}", str(path))
    return text


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case: str, world: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    extra, expected = CASES[case]
    before = snapshot(world["run"])
    listing = sorted(p.name for p in world["root"].iterdir())
    rc, out, err = run_cli(_args(world, *(_fill(a, world) for a in extra)), capsys)
    assert rc == 2, (case, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("distillistic: error: ")
    assert "Traceback" not in line
    for text in expected:
        assert _fill(text, world) in line, (case, line)
    assert out == ""
    assert snapshot(world["run"]) == before  # --overwrite did not touch the existing run
    assert sorted(p.name for p in world["root"].iterdir()) == listing


def test_an_occupied_run_directory_is_refused_without_overwrite(world: dict[str, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(world["run"])
    args = [a for a in _args(world) if a != "--overwrite"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2
    assert len(err) == 1
    assert f"'{world['run']}' already holds a run" in err[0]
    assert "--overwrite" in err[0]
    assert "--resume" in err[0]
    assert snapshot(world["run"]) == before


@pytest.mark.e2e
def test_a_file_as_out_is_refused(world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    rc, _, err = run_cli([*BASE, "--out", str(target)], capsys)
    assert rc == 2
    assert len(err) == 1
    assert "is a file" in err[0]
    assert target.read_text() == "keep me"


def test_unknown_flag_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = run_cli([*BASE, "--out", str(tmp_path / "x"), "--tempreature", "3"], capsys)
    assert rc == 2
    assert len(err) == 1
    assert "--tempreature" in err[0]
    assert not (tmp_path / "x").exists()


def _jpegs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / name / f"{i}.jpg")


def test_a_corrupt_jpeg_in_a_worker_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _jpegs(tmp_path / "images")  # 12 images: 6 / 3 / 3, every one decoded at batch size 2
    bad = tmp_path / "images" / "dog" / "2.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "images"), "--image-size", "16",
            "--model", "cnn", "--epochs", "1", "--batch-size", "2", "--num-workers", "1", "--no-progress",
            "--no-tensorboard", "--out", str(tmp_path / "run"), "--set", "split_fractions=[0.5, 0.25, 0.25]",
            "--data-hash", "listing"]  # the default content hash refuses the file before training
    rc, _, err = run_cli(args, capsys)
    assert rc == 2, err
    assert len(err) == 1, err
    assert f"image file '{bad}' cannot be decoded" in err[0]
    assert "remove or replace it" in err[0]


@pytest.mark.e2e
def test_train_prints_one_summary_line_and_list_shows_registries(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli([*BASE, "--out", str(tmp_path / "run")], capsys)
    assert rc == 0
    assert out.startswith(f"{tmp_path / 'run'}: student top1 ")
    assert out.count("\n") == 1
    rc, out, _ = run_cli(["list"], capsys)
    assert rc == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["algos"].split(", ") == METHODS.names()
    # a plugin model registered by another test in this process (module:function) is not a built-in name
    assert lines["models"].split(", ") == [n for n in MODELS.names() if ":" not in n]
    assert set(lines) == {"algos", "datasets", "models", "divergences"}


@pytest.mark.e2e
def test_yaml_then_flags_then_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"algo": "tfkd", "dataset": "digits", "model": "mlp", "epochs": 1,
                                      "alpha": 0.2, "virtual-p": 0.8, "temperature": 2.0, "batch_size": 32}))
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", str(config), "--alpha", "0.4", "--set", "temperature=3", "--batch-size", "64",
                          "--set", "virtual_p=0.7", "--no-progress", "--no-tensorboard", "--out", str(out)], capsys)
    assert rc == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["algo"], saved["model"], saved["epochs"]) == ("tfkd", "mlp", 1)  # from the YAML
    assert (saved["alpha"], saved["batch_size"]) == (0.4, 64)  # flags override the YAML
    assert (saved["temperature"], saved["virtual_p"]) == (3.0, 0.7)  # --set overrides both


@pytest.mark.multiprocess
def test_bad_input_in_a_real_process(world: dict[str, Path]) -> None:
    """The console entry point itself: exit code 2, one line on stderr, no traceback, nothing lost."""
    before = snapshot(world["run"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "distillistic", *_args(world, "--dataset", "mnist", "--data-root",
                                                                        str(world["truncated-idx"]))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("distillistic: error: '")
    assert "is truncated" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert snapshot(world["run"]) == before


def test_bad_input_after_writing_is_still_protected(world: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged IDX file that only fails while reading the labels (after the images) changes nothing either."""
    folder = tmp_path / "labels-truncated"
    write_idx_split(folder, "t10k", balanced_labels(3), gz=False)
    labels = folder / "t10k-labels-idx1-ubyte"
    write_idx(labels, balanced_labels(3))
    labels.write_bytes(labels.read_bytes()[:-1])
    before = snapshot(world["run"])
    rc, _, err = run_cli(_args(world, "--dataset", "mnist", "--data-root", str(folder)), capsys)
    assert rc == 2
    assert len(err) == 1
    assert "t10k-labels-idx1-ubyte' is truncated" in err[0]
    assert snapshot(world["run"]) == before
