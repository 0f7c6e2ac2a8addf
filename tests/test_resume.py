"""Exact resume after a crash: the real CLI in a subprocess, killed at many points, gives the same run.

The crashes are injected with ``DISTILLISTIC_FAULT`` (see :func:`distillistic.training.checkpoint.fault_point`):
the process sends itself SIGKILL (or SIGTERM / SIGINT) at a chosen point — after a training step,
half-way through writing ``last.pt``'s temporary file, between that file's fsync and its rename,
between the best and the last checkpoint of an epoch, between ``last.pt`` and the epoch's metrics
rows, before the final evaluation. Each chain of crashes and ``--resume`` s must end with weights,
optimiser states and metrics identical (bit for bit; timing fields aside) to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import _forked_cli as forked_cli
from distillistic import cli
from distillistic.training.checkpoint import load, save
from distillistic.training.runtime import rng_state, set_rng_state

# 3 epochs of 7 steps (112 training samples, batch 16); a checkpoint every 3 steps and every epoch.
# Two students (DML) with RandAugment: several optimisers and schedules, peers, augmentation keys.
ARGS = ["train", "--algo", "dml", "--students", "2", "--dataset", "synthetic", "--synthetic-samples", "160",
        "--image-size", "12", "--augment", "randaugment", "--model", "mlp", "--epochs", "3", "--batch-size", "16",
        "--checkpoint-every", "3", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]
TIMING = {"seconds", "images_per_second", "train_seconds", "train_images_per_second", "epoch_seconds",
          "costs", "train_cost", "train_flops", "teacher_flops"}
# costs: latency and peak memory; train_flops counts the teacher forwards that ran, and a resumed run reads from the
# store the killed one filled the outputs it would have computed (tests/test_costs.py checks the counts themselves)


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m distillistic ARGS`` in a process (and session) of its own, with an optional fault: forked
    from a server that has imported torch once (``tests/_forked_cli.py``), so it starts in milliseconds."""
    return forked_cli.run(args, fault=fault, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in a process of its own like the others (no global state left by other tests)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli([*ARGS, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def _summary(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads((path / "summary.json").read_text()).items() if k not in TIMING}


def _assert_same_tensors(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` equal all the way down, tensors bit for bit; timing fields (at any depth) aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for k in a.keys() - TIMING:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_identical_runs(ref: Path, got: Path) -> None:
    """Same weights, optimiser/schedule states and progress; same metrics rows and summary (timing aside)."""
    assert _summary(got)["status"] == "completed"
    assert _rows(got) == _rows(ref)
    assert _summary(got) == _summary(ref)
    names = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == names  # no temporary file left over
    for name in names:
        a, b = load(ref / "checkpoints" / name), load(got / "checkpoints" / name)
        for key in ("models", "optimizers", "schedulers", "scaler", "meters", "epoch", "num_classes"):
            _assert_same_tensors(a.get(key), b.get(key), f"{name}:{key}")
        _assert_same_tensors(a.get("progress"), b.get("progress"), f"{name}:progress")


def _killed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])


@pytest.mark.multiprocess
def test_sigkill_at_steps_during_checkpoint_writes_and_before_evaluation(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    own = [*ARGS, "--out", str(out)]
    _killed(run_cli(own, fault="step:5"))  # mid-epoch, two steps after the checkpoint of step 3
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 3
    _killed(run_cli([*own, "--resume"], fault="mid-write-last.pt:2"))  # half of the epoch-end last.pt written
    leftovers = list((out / "checkpoints").glob(".*.tmp"))
    assert leftovers, "the kill should have left the half-written temporary file"
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 6  # the previous file is intact
    _killed(run_cli([*own, "--resume"], fault="before-rename-last.pt:3"))  # complete and fsync'd, not renamed
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 9
    assert not any(p.exists() for p in leftovers)  # the resume removed the dead writer's temporary file
    _killed(run_cli([*own, "--resume"], fault="final"))  # trained, not yet evaluated
    assert not (out / "summary.json").exists()
    done = run_cli([*own, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_runs(reference, out)
    assert len(json.loads((out / "manifest.json").read_text())["resumed_at"]) == 4


@pytest.mark.multiprocess
def test_sigterm_stops_cleanly_and_the_printed_command_resumes(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_cli([*ARGS, "--out", str(out)], fault="step:4:TERM")
    assert first.returncode == 143, first.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 4  # the step in progress finished
    hint = [line for line in first.stderr.splitlines() if "resume with: " in line]
    assert len(hint) == 1, first.stderr
    command = shlex.split(hint[0].split("resume with: ", 1)[1])
    assert command[:3] == [sys.executable, "-m", "distillistic"]
    assert command[-1] == "--resume"
    resume_args = command[3:]
    _killed(run_cli(resume_args, fault="after-best:1"))  # epoch 1: best weights written, last.pt not yet
    _killed(run_cli(resume_args, fault="after-last:2"))  # epoch 2: last.pt written, its metrics rows not yet
    # Ctrl-C, then Ctrl-C again while the checkpoint is being written: stop at once, no partial file left.
    second = run_cli(resume_args, fault="step:1:INT,mid-write-last.pt:1:INT")
    assert second.returncode == 130, second.stderr[-2000:]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    done = run_cli(resume_args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_runs(reference, out)


@pytest.mark.multiprocess
def test_sigterm_to_the_process_group_with_image_workers_stops_cleanly(tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaches the data-loading workers too: the step finishes, the run checkpoints and
    exits 143, and the resumed run equals an uninterrupted one (file dataset, 2 workers, keyed random crops)."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(16):
            pixels = (torch.rand(14, 14, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    args = ["train", "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "10", "--model", "mlp",
            "--epochs", "2", "--batch-size", "8", "--num-workers", "2", "--split-fractions", "0.5,0.25,0.25",
            "--checkpoint-every", "2", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]
    reference = tmp_path / "reference"
    assert run_cli([*args, "--out", str(reference)]).returncode == 0
    out = tmp_path / "run"
    first = run_cli([*args, "--out", str(out)], fault="step:3:TERM:group")
    assert first.returncode == 143, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 3
    done = run_cli([*args, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_runs(reference, out)


@pytest.mark.e2e
def test_divergence_stops_with_the_reason_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--synthetic-samples", "160", "--image-size", "12", "--model", "mlp",
            "--epochs", "3", "--batch-size", "16", "--checkpoint-every", "1", "--log-every", "1", "--device", "cpu",
            "--no-tensorboard", "--no-progress", "--optimizer", "sgd", "--lr", "10", "--scheduler", "constant",
            "--warmup-fraction", "0", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("distillistic: error: training diverged: the loss became NaN or inf")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "NaN or inf" in summary["reason"]
    ckpt = load(out / "checkpoints" / "last.pt")
    bad_step = int(summary["reason"].rsplit("step ", 1)[1].rstrip(")"))
    assert 0 < ckpt["progress"]["global_step"] < bad_step + 7 * ckpt["progress"]["epoch"]
    for state in ckpt["models"].values():
        assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.e2e
def test_resume_with_another_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distillistic.models.builders import build_model

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("cnn", 10, 1, 12).state_dict(), teacher)
    out = tmp_path / "run"
    args = ["train", "--algo", "kd", "--teacher", "cnn", "--teacher-weights", str(teacher), "--dataset", "synthetic",
            "--synthetic-samples", "160", "--image-size", "12", "--model", "mlp", "--epochs", "1", "--batch-size",
            "16", "--device", "cpu", "--no-tensorboard", "--no-progress", "--out", str(out), "--allow-weak-teacher"]
    assert cli.main(args) == 0
    assert load(out / "checkpoints" / "last.pt")["teacher"]["source"] == str(teacher)
    torch.manual_seed(1)
    torch.save(build_model("cnn", 10, 1, 12).state_dict(), teacher)  # same path, other weights
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    assert "the teacher differs from the one the run started with (cnn from" in capsys.readouterr().err


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    """Python, NumPy and torch generators continue exactly after save -> load(weights_only) -> restore."""
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    path = tmp_path / "rng.pt"
    save({"rng": rng_state()}, path)
    expected = (random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3))
    for _ in range(5):  # move every generator on
        random.random(), np.random.rand(), torch.rand(7)
    set_rng_state(load(path)["rng"])
    got = (random.random(), float(np.random.rand()), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


@pytest.mark.parametrize("files", [False, True])
def test_a_resumed_epoch_sees_exactly_the_remaining_batches_and_augmentations(tmp_path: Path, files: bool) -> None:
    """The data position is (epoch, step): batches from ``start_step`` are the tail of the full epoch's,
    and their augmented views depend only on (data_seed, epoch, index), for in-memory and file datasets."""
    from distillistic.config import Config
    from distillistic.data.datasets import FileSource
    from distillistic.data.loader import EpochSampler, Loader, build_data
    from distillistic.data.views import ViewMaker
    from distillistic.training.setup import resolve

    cfg = resolve(Config(dataset="synthetic", synthetic_samples=90, image_size=12, augment="randaugment"))
    bundle = build_data(cfg)
    source = bundle.splits["train"]
    if files:  # the same images as PNG files, decoded in the loader
        from PIL import Image

        paths = []
        for i in range(len(source)):
            p = tmp_path / f"{i}.png"
            Image.fromarray(source.images[i, 0].numpy()).save(p)  # type: ignore[union-attr]
            paths.append(str(p))
        source = FileSource(paths, source.labels)
    sampler = EpochSampler(source.labels, 8, data_seed=5, shuffle=True)
    loader = Loader(source, sampler, 12, True, 5, workers=0)
    views = ViewMaker(bundle.info, "randaugment", 5, torch.device("cpu"))
    for epoch in (0, 2):
        full = list(loader.epoch(epoch))
        tail = list(loader.epoch(epoch, 3))
        assert len(full) == len(sampler)
        assert len(tail) == len(full) - 3
        for a, b in zip(full[3:], tail):
            assert torch.equal(a.index, b.index)
            assert torch.equal(a.images, b.images)
            assert torch.equal(views(a, train=True).base, views(b, train=True).base)
    assert not torch.equal(full[0].index, next(iter(loader.epoch(1))).index)  # epochs differ


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_files_leaves_the_global_rng_alone(tmp_path: Path, workers: int) -> None:
    """A file loader starting an epoch must not draw from the global RNG (dropout's stream): a resumed run
    starts its loaders at another moment than an uninterrupted one, and would otherwise drift from it."""
    from PIL import Image

    from distillistic.data.datasets import FileSource
    from distillistic.data.loader import EpochSampler, Loader

    paths = []
    for i in range(12):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    source = FileSource(paths, torch.arange(12) % 3)
    loader = Loader(source, EpochSampler(source.labels, 4, 0, True), 8, True, 0, workers=workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        assert len(list(loader.epoch(epoch, start_step=epoch))) == 3 - epoch
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.e2e
def test_resume_of_a_dir_without_checkpoint_or_with_another_config_is_refused(
        reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("algo: baseline\n")
    assert cli.main([*ARGS, "--out", str(partial), "--resume"]) == 2
    assert "holds no checkpoints/last.pt to resume from" in capsys.readouterr().err
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert cli.main([*ARGS, "--lr", "0.002", "--out", str(reference), "--resume"]) == 2
    assert "the config differs from the run being resumed (lr: 0.001 -> 0.002)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


@pytest.mark.multiprocess
def test_a_forked_cli_child_is_a_process_of_its_own_seeded_like_a_fresh_one(tmp_path: Path) -> None:
    """The children of tests/_forked_cli.py (every run_cli above): own pid and session, the request's argv,
    environment and directory, generators and string hashes drawn anew, and exit codes as subprocess gives."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, random, sys\nimport numpy, torch\n"
        "print(json.dumps({'pid': os.getpid(), 'session': os.getsid(0), 'argv': sys.argv, 'cwd': os.getcwd(),\n"
        "    'env': os.environ.get('PROBE'), 'fault': os.environ.get('DISTILLISTIC_FAULT'), 'hash': hash('x'),\n"
        "    'draws': [random.random(), float(numpy.random.rand()), torch.initial_seed()]}))\n"
        "os.kill(os.getpid(), 9) if sys.argv[1:] == ['kill'] else sys.exit(int(sys.argv[1]))\n")
    seen = []
    for code in (3, 0):
        done = forked_cli.run([str(code)], env=forked_cli.cli_env(PROBE="p"), script=str(script))
        assert done.returncode == code, done.stderr
        seen.append(json.loads(done.stdout))
    assert forked_cli.run(["kill"], script=str(script)).returncode == -signal.SIGKILL
    a, b = seen
    assert a["pid"] != b["pid"]
    assert os.getpid() not in (a["pid"], b["pid"])
    assert (a["session"], b["session"]) == (a["pid"], b["pid"])  # each the leader of a session of its own
    assert a["argv"] == [str(script), "3"]
    assert a["cwd"] == os.getcwd()
    assert (a["env"], a["fault"]) == ("p", None)
    assert a["hash"] != b["hash"]  # the two servers' string-hash seeds differ, as two fresh processes' do
    assert all(x != y for x, y in zip(a["draws"], b["draws"]))  # Python's, NumPy's and torch's generators


def killed_then_resumed(args: list[str], out: Path) -> None:
    """Run ``args`` into ``out``, SIGKILL it at step 5 (two steps after the checkpoint of step 3), resume it."""
    _killed(run_cli([*args, "--out", str(out)], fault="step:5"))
    assert load(out / "checkpoints" / "last.pt")["progress"]["global_step"] == 3
    done = run_cli([*args, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.multiprocess
def test_independent_peer_views_resume_exactly(tmp_path: Path) -> None:
    """KDCL with each student on its own augmented view (keyed by (data_seed, epoch, index, student)): killed
    mid-epoch after a checkpoint, then resumed, it ends identical to an uninterrupted run; no RNG state needed."""
    args = [*ARGS[:2], "kdcl", *ARGS[3:], "--epochs", "2", "--peer-views", "independent"]
    ref, out = tmp_path / "reference", tmp_path / "run"
    done = run_cli([*args, "--out", str(ref)])
    assert done.returncode == 0, done.stderr[-2000:]
    killed_then_resumed(args, out)
    assert_identical_runs(ref, out)
    assert load(out / "checkpoints" / "last.pt")["config"]["peer_views"] == "independent"
