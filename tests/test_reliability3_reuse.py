"""Reliability, third round (second part): what a run derives is checked when it is reused (best weights,
generations, a run's data, sweeps of derived keys), waits that say who holds a lock, a resume on another machine,
fp64 teacher stores, a --model that a list of students would ignore.

Each test reproduces a failure of the code before this round and checks the fixed behaviour with a known answer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

import pytest

from bad_inputs import run_argv

TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--epochs", "1",
        "--batch-size", "16", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


def _train(out: Path, *args: str) -> tuple[int, str]:
    return run_argv(["train", *TINY, *args, "--out", str(out)])


# --- a --model that a list of students would ignore -------------------------------------------------------------

def test_model_not_among_the_listed_students_is_refused(tmp_path: Path) -> None:
    """``--model resnet50 --students mlp,cnn`` trained an mlp and a cnn and recorded ``model: resnet50``."""
    code, text = _train(tmp_path / "run", "--algo", "dml", "--model", "resnet50", "--students", "mlp,cnn")
    assert (code, text) == (2, "distillistic: error: config key 'model' = 'resnet50' is not allowed: left out when "
                               "--students lists the architectures (mlp, cnn): each student is built from its own "
                               "entry, so --model would be ignored; remove --model, or list it in --students\n")
    assert not (tmp_path / "run").exists()
    code, text = _train(tmp_path / "ok", "--algo", "dml", "--model", "mlp", "--students", "mlp,cnn")
    assert code == 0, text


# --- waits that say who holds the lock ---------------------------------------------------------------------------

@pytest.mark.unit
def test_a_wait_on_a_lock_says_who_holds_it_and_how_to_break_it(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from distillistic.locks import try_lock, wait_lock

    path = tmp_path / "teacher.lock"
    holder = path.open("a")
    assert try_lock(holder)  # the holder notes itself in the file
    note = json.loads(path.read_text())
    assert note["pid"] == os.getpid()
    assert note["host"] == platform.node()
    threading.Timer(0.5, lambda: fcntl.flock(holder, fcntl.LOCK_UN)).start()
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="distillistic"), path.open("a") as waiter:
        wait_lock(waiter, path, "the teacher being trained")
        waited = time.monotonic() - start
    holder.close()
    assert waited >= 0.4  # it did wait for the holder
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith(f"waiting for the teacher being trained: '{path}' is held by process {os.getpid()} "
                               f"on {platform.node()} since ")
    assert lines[0].endswith(f"; if that process hangs, kill {os.getpid()}: the system then releases its lock "
                             "(there is no file to delete)")
    # the new holder noted itself
    assert json.loads(path.read_text())["pid"] == os.getpid()


# --- best-*.pt checked when the run resumes -----------------------------------------------------------------------

def _stopped_run(out: Path, monkeypatch: pytest.MonkeyPatch, point: str, *args: str) -> None:
    """A 2-epoch run stopped by SIGTERM at fault point ``point`` (in this process), its last.pt sound."""
    monkeypatch.setenv("DISTILLISTIC_FAULT", f"{point}:1:TERM")
    from distillistic import fileio

    fileio._FAULT_HITS.clear()
    code, text = _train(out, "--model", "mlp", "--epochs", "2", *args)
    monkeypatch.delenv("DISTILLISTIC_FAULT")
    assert code == 143, text
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def _weights(path: Path) -> dict[str, object]:
    from distillistic.training.checkpoint import read_state_dict

    return read_state_dict(path)[0]


@pytest.mark.parametrize("fault", ["another-seed", "flipped-byte"])
def test_a_foreign_or_damaged_best_is_found_at_resume_and_the_run_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Stopped in epoch 2 with epoch 1's best; the best file is replaced by another seed's (or damaged): the
    resume says so at once, sets it aside, and the best-on-val record restarts with epoch 2 (it used to train on
    and fail at the very end, or export another run's weights as this one's best)."""
    from bad_inputs import _flip_tensor_byte

    out = tmp_path / "run"
    _stopped_run(out, monkeypatch, "after-last")
    best = out / "checkpoints" / "best-student.pt"
    if fault == "another-seed":
        code, text = _train(tmp_path / "other", "--model", "mlp", "--epochs", "2", "--seed", "7")
        assert code == 0, text
        best.write_bytes((tmp_path / "other" / "checkpoints" / "best-student.pt").read_bytes())
        problem = ("is not the file this run wrote (the sha256 of its weights differs from the one last.pt "
                   "recorded: another run's, or another seed's)")
    else:
        _flip_tensor_byte(best)
        problem = "is damaged (its content differs from its sha256)"
    planted = best.read_bytes()
    code, text = run_argv(["train", *TINY, "--model", "mlp", "--epochs", "2", "--out", str(out), "--resume"])
    assert code == 0, text
    lines = text.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("--resume: "))
    assert lines[warning] == (f"--resume: {best} {problem}; set aside as best-student.pt.rejected and not used: "
                              "its best-on-val record restarts with the next epoch")
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("epoch 2/2"))  # at the start
    assert (out / "checkpoints" / "best-student.pt.rejected").read_bytes() == planted  # kept, never used
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["models"]["student"]["val_best"]["epoch"] == 2  # the only epoch trained since the resume
    last = _weights(out / "checkpoints" / "last.pt")
    assert all(bool((v == last[k]).all()) for k, v in _weights(best).items())  # epoch 2's weights


def test_a_damaged_best_never_makes_a_run_impossible_to_finish(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped during the final evaluation (every epoch trained) with a damaged best file: the resume only
    evaluates; it failed on the best file at the end, every time. Now the last epoch's weights (sound, in last.pt)
    are the best, with that epoch's val metrics from the history."""
    from bad_inputs import _flip_tensor_byte

    out = tmp_path / "run"
    _stopped_run(out, monkeypatch, "final")
    best = out / "checkpoints" / "best-student.pt"
    _flip_tensor_byte(best)
    code, text = run_argv(["train", *TINY, "--model", "mlp", "--epochs", "2", "--out", str(out), "--resume"])
    assert code == 0, text
    assert (f"--resume: {best} is damaged (its content differs from its sha256); set aside as "
            "best-student.pt.rejected and not used: the last epoch's weights (from last.pt) are its best, epoch 2"
            ) in text.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    val2 = next(r for r in rows if (r["epoch"], r["split"], r["model"]) == (2, "val", "student"))
    assert summary["models"]["student"]["val_best"]["epoch"] == 2
    assert summary["models"]["student"]["val_best"]["top1"] == val2["top1"]
    last = _weights(out / "checkpoints" / "last.pt")
    assert all(bool((v == last[k]).all()) for k, v in _weights(best).items())


# --- a resume on another machine ---------------------------------------------------------------------------------

def test_a_resume_on_another_thread_count_proceeds_with_one_line(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run moved to a machine with other cores was refused ("the config differs ... threads: 1 -> 2"),
    stranding it; now it continues and says, once, that bit-exactness needs the same threads and device."""
    out = tmp_path / "run"
    _stopped_run(out, monkeypatch, "after-last")
    code, text = run_argv(["train", *TINY, "--model", "mlp", "--epochs", "2", "--threads", "2", "--out", str(out),
                           "--resume"])
    assert code == 0, text
    moved = [line for line in text.splitlines() if line.startswith("--resume on another machine setting")]
    assert moved == [  # the thread count in use, or (capped at the cores this process may use) the setting
        "--resume on another machine setting (threads 1 -> 2): continuing; the run is then not bit-identical to an "
        "uninterrupted one, which needs the same device, threads and compilation"]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    # another setting that changes what is computed is still refused
    code, text = run_argv(["train", *TINY, "--model", "mlp", "--epochs", "2", "--lr", "0.01", "--out", str(out),
                           "--resume"])
    assert code == 2
    assert "the config differs from the run being resumed (lr: 0.001 -> 0.01)" in text
