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

@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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

@pytest.mark.e2e
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


# --- generations: a resume with other settings ------------------------------------------------------------------

@pytest.mark.e2e
def test_a_generations_resume_with_another_config_is_refused_and_rewrites_nothing(tmp_path: Path) -> None:
    """Born-again networks: ``--resume --lr 0.01`` on a run trained at 0.001 skipped every completed generation
    and rewrote config.yaml to say lr 0.01: a config describing training that never happened. Now refused as a
    plain resume is, whether the run's own config.yaml is there yet or only its generations' are."""
    out = tmp_path / "ban"
    args = ["--algo", "ban", "--generations", "2", "--model", "mlp", "--allow-weak-teacher"]
    code, text = _train(out, *args)
    assert code == 0, text
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}
    code, text = run_argv(["train", *TINY, *args, "--lr", "0.01", "--out", str(out), "--resume"])
    assert (code, text) == (2, f"distillistic: error: --resume: the config differs from the run being resumed "
                               f"('{out / 'config.yaml'}') (lr: 0.001 -> 0.01); resume with the same settings, or "
                               "start a new --out\n")
    (out / "config.yaml").unlink()  # as a run stopped in its last generation has none yet
    del before[out / "config.yaml"]
    code, text = run_argv(["train", *TINY, *args, "--lr", "0.01", "--out", str(out), "--resume"])
    assert (code, text) == (2, f"distillistic: error: --resume: the config differs from the run being resumed "
                               f"('{out / 'gen1' / 'config.yaml'}') (lr: 0.001 -> 0.01); resume with the same "
                               "settings, or start a new --out\n")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"} == before
    code, text = run_argv(["train", *TINY, *args, "--out", str(out), "--resume"])  # the same settings: resumes
    assert code == 0, text
    assert "generation 1 is complete; skipping it" in text


# --- commands that re-read a run's data -------------------------------------------------------------------------

def _idx_run(tmp_path: Path) -> tuple[Path, Path]:
    import numpy as np

    from bad_inputs import write_idx

    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (120, 8, 8), np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", (np.arange(120) % 3).astype(np.uint8))
    out = tmp_path / "run"
    code, text = run_argv(["train", *TINY, "--model", "mlp", "--dataset", "mnist", "--data-root", str(data),
                           "--out", str(out)])
    assert code == 0, text
    return data, out


@pytest.mark.e2e
def test_calibrate_checks_the_data_first_and_takes_the_data_root_its_advice_names(tmp_path: Path) -> None:
    """calibrate rebuilt a run's data from its config.yaml and never compared it with the run's: a changed
    file was calibrated on silently, and a moved one got advice ('pass --data-root') calibrate did not accept."""
    import numpy as np

    from bad_inputs import write_idx

    data, out = _idx_run(tmp_path)
    moved = data.rename(tmp_path / "moved")
    code, text = run_argv(["calibrate", str(out)])
    assert (code, text) == (2, f"distillistic: error: data folder '{data}' does not exist; pass --data-root "
                               "pointing at the IDX files\n")
    code, text = run_argv(["calibrate", str(out), "--data-root", str(moved)])  # as the advice says
    assert code == 0, text
    assert json.loads((out / "calibration.json").read_text())["models"]["student"]["temperature"] > 0
    (out / "calibration.json").unlink()
    images = np.random.default_rng(0).integers(0, 255, (120, 8, 8), np.uint8)
    images[0, 0, 0] ^= 1  # one pixel
    write_idx(moved / "t10k-images-idx3-ubyte.gz", images)
    code, text = run_argv(["calibrate", str(out), "--data-root", str(moved)])
    assert (code, text) == (2, f"distillistic: error: calibrate: the data in '{moved}' is not the data '{out}' was "
                               f"trained on (its checksum differs from {out / 'manifest.json'}'s); pass --data-root "
                               "pointing at that data\n")
    assert not (out / "calibration.json").exists()


# --- the CIFAR reader checks the md5 of the extracted files ------------------------------------------------------

@pytest.mark.e2e
def test_an_extracted_cifar_file_with_one_changed_byte_is_refused(tmp_path: Path) -> None:
    """The extracted files' md5s were known (torchvision's list) but never checked: a changed pixel trained on."""
    from _cifar_files import write_cifar

    root = write_cifar(tmp_path / "cifar", "cifar10", per_class=2, test_per_class=1)
    args = ["--dataset", "cifar10", "--data-root", str(root), "--model", "mlp"]
    code, text = _train(tmp_path / "ok", *args)
    assert code == 0, text
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    data = bytearray(batch.read_bytes())
    data[-100] ^= 0x01
    batch.write_bytes(bytes(data))
    code, text = _train(tmp_path / "bad", *args)
    from distillistic.data.cifar import CIFAR

    known = next(md5 for name, md5 in CIFAR["cifar10"].file_md5 if name == "data_batch_3")  # the published one
    assert (code, text) == (2, f"distillistic: error: '{batch}' does not have the known md5 {known} of CIFAR-10's "
                               f"data_batch_3; it is damaged or a different file: delete '{batch.parent}' to extract "
                               "or download it again\n")
    assert not (tmp_path / "bad").exists()


# --- fp64 means fp64 for the teacher store ------------------------------------------------------------------------

@pytest.mark.e2e
def test_an_fp64_run_reading_the_store_equals_the_run_that_filled_it(tmp_path: Path) -> None:
    """The store kept logits as float32 whatever the precision: an fp64 run reading them trained on rounded
    teacher logits, so it differed from the fp64 run that computed them. Now they are kept as float64."""
    import torch
    from safetensors.torch import load_file

    from distillistic.training.checkpoint import load

    store = tmp_path / "store"
    args = ["--model", "mlp", "--algo", "kd", "--teacher", "cnn", "--teacher-weights", "random", "--precision",
            "fp64", "--epochs", "2", "--teacher-store", str(store)]

    def trained(name: str) -> tuple[list[dict[str, object]], dict[str, torch.Tensor]]:
        code, text = _train(tmp_path / name, *args)
        assert code == 0, text
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]
        return rows, load(tmp_path / name / "checkpoints" / "last.pt")["models"]["student"]

    cold_rows, cold = trained("cold")
    warm_rows, warm = trained("warm")
    assert [(r["loss"], r["kd"]) for r in warm_rows if r["split"] == "train"] == \
        [(r["loss"], r["kd"]) for r in cold_rows if r["split"] == "train"]
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    files = sorted(store.rglob("epoch-*.safetensors"))
    assert len(files) == 2  # the warm run read both epochs
    assert load_file(str(files[0]))["logits"].dtype == torch.float64


# --- a sweep whose cells derive a key from another run --------------------------------------------------------

@pytest.mark.e2e
def test_a_sweep_of_cells_deriving_virtual_p_from_a_run_reruns_resumes_and_extends(tmp_path: Path) -> None:
    """Cells with ``virtual_p_from`` save the p they derived; a re-run compared that with the sweep's unset p and
    called every finished cell a conflict, so such a sweep could never be re-run, resumed or extended."""
    import yaml

    code, text = _train(tmp_path / "base", "--model", "mlp")  # the baseline run p is read from
    assert code == 0, text
    base = {"dataset": "synthetic", "synthetic_samples": 96, "image_size": 8, "epochs": 1, "batch_size": 16,
            "device": "cpu", "threads": 1, "tensorboard": False, "progress": False, "model": "mlp", "algo": "tfkd",
            "virtual_p_from": str(tmp_path / "base")}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**base, "grid": {"seed": [0]}}))
    out = tmp_path / "runs"
    code, text = run_argv(["sweep", str(sweep), "--out", str(out)])
    assert code == 0, text
    cell = next(p for p in out.iterdir() if (p / "summary.json").is_file())
    p = json.loads((tmp_path / "base" / "summary.json").read_text())["models"]["student"]["val_best"]["top1"]
    assert yaml.safe_load((cell / "config.yaml").read_text())["virtual_p"] == p  # derived, and saved
    code, text = run_argv(["sweep", str(sweep), "--out", str(out)])  # re-run: nothing to do
    assert code == 0, text
    assert "already complete, skipped" in text
    assert "conflict" not in text
    sweep.write_text(yaml.safe_dump({**base, "grid": {"seed": [0, 1]}}))  # extended by a seed
    code, text = run_argv(["sweep", str(sweep), "--out", str(out)])
    assert code == 0, text
    assert text.count("already complete, skipped") == 1
    assert len([p for p in out.iterdir() if (p / "summary.json").is_file()]) == 2
