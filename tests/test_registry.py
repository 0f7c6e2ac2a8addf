"""Tests that parametrize over the methods' registry, and the lifecycle of a term with parameters and state.

* Every registered method trains end to end on digits from the Python API (a new method gets this run
  without another line), and every method family (and every method with its own module around the student)
  runs under ``torchrun --nproc_per_node 2`` on the CPU.
* A test-only method (``tests/_probe_method.py``) whose term owns a trainable parameter per student and an
  EMA buffer trains, resumes bit for bit after SIGKILL, exports students without the term's parameters,
  and runs under torchrun.
* The teacher-output store filled under torchrun is read by a later run on one process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import distillistic
from _torchrun import FOLDER, job, outcome
from _util import tiny
from distillistic import train
from distillistic.methods.registry import METHODS, Method
from distillistic.training.checkpoint import load

SRC = str(Path(distillistic.__file__).resolve().parents[1])
PROBE = str(Path(__file__).with_name("_probe_method.py"))


def settings(spec: Method) -> dict[str, Any]:
    """The smallest run of a method, from what it declares: a random cnn teacher, the cohort it needs."""
    out: dict[str, Any] = {"algo": spec.name}
    if spec.needs_teacher:
        out |= {"teacher": "cnn", "teacher_weights": "random"}
    if spec.min_students > 1:
        out["students"] = spec.min_students
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_end_to_end(name: str, tmp_path: Path) -> None:
    spec = METHODS.get(name)
    result = train(tiny(tmp_path / "run", **settings(spec)))
    summary = result.summary
    assert summary["status"] == "completed"
    assert summary["algo"] == name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train" and r["model"].startswith("student")]
    assert len(train_rows) == max(spec.min_students, 1)
    objective = result.summary["objective"]
    assert objective.startswith("L = ")
    for row in train_rows:
        assert torch.isfinite(torch.tensor(row["loss"]))
        assert (row["alpha"] is None) == (spec.composition == "sum")  # a sum composition has no alpha to log


def test_train_help_names_every_built_in_method(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the methods from their specs (read without torch): they must be the registry's."""
    from _util import run_cli

    built_in = [n for n in METHODS.names() if METHODS.get(n).terms.__module__.startswith("distillistic.")]
    assert built_in == sorted(n for n in METHODS.names() if n != "probe")
    rc, out, _ = run_cli(["train", "--help"], capsys)
    assert rc == 0
    algo = " ".join(out.split("--algo ALGO", 1)[1].split("--out OUT", 1)[0].split())
    listed = algo.removeprefix("algorithm: ").split(" (")[0].split(", ")
    assert listed == built_in


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLISTIC_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


SMALL = ["--dataset", "synthetic", "--synthetic-samples", "200", "--image-size", "8", "--model", "cnn",
         "--epochs", "1", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--threads", "1"]


def _family_representatives() -> list[str]:
    """One method per family, and every method that puts a module of its own around the student (SimKD's
    projector and reused classifier): that module's parameters meet DistributedDataParallel on their own."""
    families: dict[str, str] = {}
    for name in METHODS.names():
        families.setdefault(METHODS.get(name).family, name)
    own_head = [name for name in METHODS.names() if METHODS.get(name).rebuild_student is not None]
    return sorted({*families.values(), *own_head})


def _flags(spec: Method) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings(spec).items()]


FAMILY_JOBS = {name: job(f"family-{name}", "test_registry.py::test_every_method_family_runs_under_torchrun", "train",
                         *_flags(METHODS.get(name)), *SMALL, "--allow-weak-teacher", "--out", f"{FOLDER}/run")
               for name in _family_representatives()}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", _family_representatives())
def test_every_method_family_runs_under_torchrun(name: str, request: pytest.FixtureRequest) -> None:
    """Every family's run, in one torchrun launch with the other tests' runs (:mod:`_torchrun`)."""
    got = outcome(request, FAMILY_JOBS[name].name)
    # One epoch of random-looking data: a trained-first teacher (ban's generation 1) may still be at chance.
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


# --- a term with a trainable parameter and state -------------------------------------------------------

PROBE_ARGS = ["train", "--algo", "probe", "--students", "2", *SMALL[:-8], "--epochs", "2", "--batch-size", "16",
              "--checkpoint-every", "3", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


def _probe(tmp_path: Path, args: list[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python tests/_probe_method.py ARGS`` in a process of its own, forked from a server that has imported
    torch once (``tests/_forked_cli.py``), with an optional fault."""
    import _forked_cli

    return _forked_cli.run(args, fault=fault, timeout=300, env=_env(tmp_path), script=PROBE)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_term_with_parameters_and_state_trains_resumes_exactly_and_exports_without_them(tmp_path: Path) -> None:
    ref, got = tmp_path / "reference", tmp_path / "resumed"
    done = _probe(tmp_path, [*PROBE_ARGS, "--out", str(ref)])
    assert done.returncode == 0, done.stderr[-3000:]
    final = load(ref / "checkpoints" / "last.pt")
    scales = final["terms"]["terms.0.scale.0"], final["terms"]["terms.0.scale.1"]
    assert all(float(s) != 0.0 for s in scales), "the term's parameter should have trained"
    assert float(final["terms"]["terms.0.ema"].abs().sum()) > 0, "the EMA state should have moved"
    # SIGKILL mid-epoch (after step 5; the last checkpoint is at step 3), then resume to the end.
    killed = _probe(tmp_path, [*PROBE_ARGS, "--out", str(got)], fault="step:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _probe(tmp_path, [*PROBE_ARGS, "--out", str(got), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load(got / "checkpoints" / "last.pt")
    for key in ("models", "terms", "optimizers"):
        a, b = final[key], again[key]
        flat_a = a if key != "optimizers" else {str(i): o["state"] for i, o in enumerate(a)}
        flat_b = b if key != "optimizers" else {str(i): o["state"] for i, o in enumerate(b)}
        assert json.dumps(_shapes(flat_a)) == json.dumps(_shapes(flat_b)), key
        for (ka, va), (_, vb) in zip(_leaves(flat_a), _leaves(flat_b)):
            assert torch.equal(va, vb), f"{key}: {ka}"
    # Export: the students' own weights only, not the term's scale.
    export = _probe(tmp_path, ["export", str(ref)])
    assert export.returncode == 0, export.stderr[-2000:]
    for name in ("student0", "student1"):
        state = safetensors.torch.load_file(str(ref / "export" / f"{name}.safetensors"))
        assert set(state) == set(final["models"][name])
        assert not any("scale" in k for k in state)
    # The optimizer of each student holds the student's parameters and its own scale: one more tensor.
    n_student = len([v for v in final["models"]["student0"].values() if v.is_floating_point()])
    assert len(final["optimizers"][0]["param_groups"][0]["params"]) > 0
    assert len(final["optimizers"][0]["state"]) <= n_student + 1


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree, key=str) for leaf in _leaves(tree[k], f"{prefix}.{k}")]
    if isinstance(tree, list | tuple):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return []


def _shapes(tree: Any) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in _leaves(tree)]


PROBE_JOB = job("probe", "test_registry.py::test_a_term_with_parameters_runs_under_torchrun", *PROBE_ARGS, "--out",
                f"{FOLDER}/run", imports=("_probe_method",))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_term_with_parameters_runs_under_torchrun(request: pytest.FixtureRequest) -> None:
    """The probe's run, in one torchrun launch with the other tests' runs (:mod:`_torchrun`; its ranks import
    the probe, as ``python tests/_probe_method.py`` does, before this run)."""
    got = outcome(request, PROBE_JOB.name)
    assert got.codes == {0: 0, 1: 0}, got.tail()
    out = got.folder / "run"
    terms = load(out / "checkpoints" / "last.pt")["terms"]
    assert float(terms["terms.0.scale.0"]) != 0.0


# --- the teacher-output store under torchrun -----------------------------------------------------------


STORE_ARGS = ["--algo", "kd", "--teacher", "cnn", "--teacher-weights", "random", "--data-seed", "5", *SMALL]
STORE_JOB = job("store-filled", "test_registry.py::test_store_filled_under_torchrun_is_read_on_one_process", "train",
                *STORE_ARGS, "--out", f"{FOLDER}/ddp")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_store_filled_under_torchrun_is_read_on_one_process(request: pytest.FixtureRequest,
                                                            capsys: pytest.CaptureFixture[str],
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is filled in one torchrun launch with the other tests' runs (:mod:`_torchrun`), then read by a
    run on one process: this one (its progress lines are the ``distillistic`` logger's, caught here)."""
    from _util import run_cli

    first = outcome(request, STORE_JOB.name)
    assert first.codes == {0: 0, 1: 0}, first.tail()
    store = first.folder / "cache" / "teacher-store"
    files = sorted(p.name for p in store.rglob("*.safetensors"))
    assert {"val.safetensors", "test.safetensors", "epoch-0000.safetensors"} <= set(files)
    # One process, same teacher, data and transform: the evaluation views are all stored (no ragged tail there).
    monkeypatch.setenv("DISTILLISTIC_CACHE", str(first.folder / "cache"))
    caplog.set_level("INFO", logger="distillistic")
    code, _, errors = run_cli(["train", *STORE_ARGS, "--out", str(first.folder / "one")], capsys)
    assert code == 0, errors[-20:]
    assert "1 epoch(s) stored" in caplog.text
    found = re.search(r"teacher store: (\d+) batches read, (\d+) computed", caplog.text)
    assert found is not None, caplog.text[-2000:]
    assert int(found.group(1)) > int(found.group(2)) > -1  # most batches read; a few in the ragged tail maybe not
