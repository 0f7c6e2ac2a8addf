"""Two processes under torchrun (Gloo on the CPU): one run directory, metrics over the whole held-out splits.

Both runs share one torchrun launch with the other tests' runs (:mod:`_torchrun`)."""

from __future__ import annotations

import json

import pytest

from _torchrun import FOLDER, job, outcome

KD = job("kd-teacher-first", "test_distributed.py::test_torchrun_two_processes_kd_with_teacher_trained_first",
         "train", "--algo", "kd", "--teacher", "cnn", "--teacher-epochs", "1", "--dataset", "synthetic",
         "--synthetic-samples", "300", "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--out",
         f"{FOLDER}/run", "--no-progress", "--no-tensorboard",
         "--allow-weak-teacher")  # a 1-epoch teacher on 300 images may be near chance: checked, not refused
KDCL = job("kdcl-independent-views",
           "test_distributed.py::test_torchrun_two_processes_kdcl_with_independent_peer_views",
           "train", "--algo", "kdcl", "--peer-views", "independent", "--augment", "randaugment", "--dataset",
           "synthetic", "--synthetic-samples", "200", "--image-size", "8", "--model", "cnn", "--epochs", "1",
           "--batch-size", "32", "--out", f"{FOLDER}/run", "--no-progress", "--no-tensorboard")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_two_processes_kd_with_teacher_trained_first(request: pytest.FixtureRequest) -> None:
    got = outcome(request, KD.name)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    sizes = manifest["dataset"]["sizes"]
    # Every held-out sample counted exactly once across the two ranks (no padding in evaluation).
    for name in ("student", "teacher"):
        assert summary["models"][name]["test"]["n"] == sizes["test"]
        assert summary["models"][name]["val_best"]["n"] == sizes["val"]
    # Rank 0 alone writes: one summary line on stdout, one row per (epoch, model, split).
    assert got.stdout.count(str(out)) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len({(r["epoch"], r["model"], r["split"]) for r in rows}) == 2


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_two_processes_kdcl_with_independent_peer_views(request: pytest.FixtureRequest) -> None:
    """Each rank makes its students' own views of its samples from their keys (data_seed, epoch, index, student):
    nothing to share between ranks, and the run completes with every held-out sample counted once."""
    got = outcome(request, KDCL.name)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert summary["status"] == "completed"
    for name in ("student0", "student1", "ensemble"):
        assert summary["models"][name]["test"]["n"] == manifest["dataset"]["sizes"]["test"]
