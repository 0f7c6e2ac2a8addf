"""Reliability, third round: self-training covers cohorts, derived artefacts are checked when reused, numbers
that overflow or exhaust are refused up front, waits say what they wait for, the CIFAR reader checks shapes, fp64
stores stay fp64 and a report survives any malformed summary field.

Each test reproduces a failure of the code before this round and checks the fixed behaviour with a known answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bad_inputs import run_argv

TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--epochs", "1",
        "--batch-size", "16", "--device", "cpu", "--threads", "1", "--no-tensorboard", "--no-progress"]


def _train(out: Path, *args: str) -> tuple[int, str]:
    return run_argv(["train", *TINY, *args, "--out", str(out)])


# --- self-training of a cohort: each student by its own architecture ---------------------------------------------

@pytest.mark.e2e
def test_tfkd_self_teaches_a_listed_student_by_its_own_architecture(tmp_path: Path) -> None:
    """``--students cnn``: the student is a cnn, so its self-teacher is a cnn (it was the architecture of
    ``--model``: silently KD from another architecture); the start line names the student truly."""
    code, text = _train(tmp_path / "run", "--algo", "tfkd_self", "--students", "cnn", "--allow-weak-teacher")
    assert code == 0, text
    start = next(line for line in text.splitlines() if line.startswith("start: tfkd_self"))
    assert "1 x cnn, teacher cnn |" in start
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["teacher"] == "cnn"


def test_tfkd_self_refuses_a_cohort_of_several_architectures_or_another_teacher(tmp_path: Path) -> None:
    code, text = _train(tmp_path / "a", "--algo", "tfkd_self", "--model", "mlp", "--students", "mlp,cnn")
    assert code == 2
    assert text.count("\n") == 1
    assert "the students are cnn, mlp and one run has one teacher" in text
    # the teacher equals --model but not the listed student: refused (it used to pass, comparing with --model)
    code, text = _train(tmp_path / "b", "--algo", "tfkd_self", "--students", "cnn", "--teacher", "mlp")
    assert code == 2
    assert text.count("\n") == 1
    assert "taught by the student's own architecture ('cnn'), not by 'mlp'" in text
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.e2e
def test_the_start_line_names_a_mixed_cohort(tmp_path: Path) -> None:
    code, text = _train(tmp_path / "run", "--algo", "dml", "--students", "mlp,cnn")
    assert code == 0, text
    assert "start: dml on synthetic, mlp, cnn | " in text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


# --- numbers that overflow or exhaust ------------------------------------------------------------------------------

def test_parameter_count_never_allocates_a_head_and_matches_the_real_model() -> None:
    """regnet is counted by a real build: with a one-class head and the other rows counted (it allocated them
    all: 10**12 classes tried to allocate 1.7 PB)."""
    from distillistic.models.builders import build_model, parameter_count

    real = sum(p.numel() for p in build_model("regnet_y_400mf", 37, 3, 32).parameters())
    assert parameter_count("regnet_y_400mf", 37) == real
    assert parameter_count("regnet_y_400mf", 10**9) == real + (10**9 - 37) * (440 + 1)  # 440 features + bias


def test_a_model_that_cannot_read_the_resolution_is_refused_before_the_run_directory(tmp_path: Path) -> None:
    from distillistic.models.builders import check_fits

    check_fits("densenet121", 10, 3, 32, "student")  # reads 32 px
    code, text = _train(tmp_path / "run", "--model", "densenet121")  # 8 px: it crashed at the first step
    assert code == 2
    assert text == ("distillistic: error: the student 'densenet121' cannot read 8 px images (its feature maps "
                    "shrink to nothing); use --image-size (or the student's resolution) of at least 32 px, or "
                    "choose a model for small images\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_threads_above_the_cores_are_capped_with_one_line(tmp_path: Path) -> None:
    import torch

    from distillistic.training.cores import available_cores

    cores = available_cores()
    try:
        code, text = _train(tmp_path / "run", "--model", "mlp", "--threads", str(cores + 7))
    finally:
        torch.set_num_threads(1)
    assert code == 0, text
    assert (f"threads: --threads {cores + 7} is more than the {cores} cores this process may use (its affinity "
            f"and CPU quota); using {cores}") in text.splitlines()
    assert f"{cores} threads, world size 1" in text


# --- a report survives any malformed summary field -----------------------------------------------------------------

def _paths(value: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a JSON mapping (its leaves and its inner mappings)."""
    if not isinstance(value, dict):
        return [prefix]
    out = [prefix] if prefix else []
    for k, v in value.items():
        out += _paths(v, (*prefix, k))
    return out


@pytest.mark.e2e
def test_a_report_survives_any_malformed_summary_field(tmp_path: Path) -> None:
    """Every field of a real cohort run's summary.json replaced by a string, a list, null, a mapping or a boolean:
    ``report`` still writes its table (the run left out, or the field read as missing), never a traceback."""
    import os
    import shutil

    run = tmp_path / "trained"
    code, text = _train(run, "--algo", "dml", "--students", "2", "--model", "mlp")
    assert code == 0, text
    summary = json.loads((run / "summary.json").read_text())
    values = ("x", [1], None, {"a": "b"}, True)
    paths = _paths(summary)
    for shift in range(len(values)):  # each round: one copy per field, that field malformed; one report of all
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        shutil.copytree(run, tmp_path / "good", copy_function=os.link)  # hard links: the run's files, uncopied
        for i, path in enumerate(paths):
            edited = json.loads(json.dumps(summary))
            parent = edited
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = values[(i + shift) % len(values)]
            bad = tmp_path / "runs" / f"bad{i}"
            shutil.copytree(tmp_path / "good", bad, copy_function=os.link)
            (bad / "summary.json").unlink()  # a file of its own, not the linked one
            (bad / "summary.json").write_text(json.dumps(edited))
        shutil.move(tmp_path / "good", tmp_path / "runs" / "good")
        code, text = run_argv(["report", str(tmp_path / "runs"), "--out", str(tmp_path / f"report{shift}")])
        assert code == 0, text
        assert "Traceback" not in text
        assert (tmp_path / f"report{shift}" / "report.md").is_file()


# --- the CIFAR reader ----------------------------------------------------------------------------------------------

class _HugeArray:
    """Pickles as numpy's ``_reconstruct(ndarray, (10**12,), b'b')``: an uninitialised terabyte array."""

    def __reduce__(self) -> tuple[object, ...]:
        import numpy as np
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (10**12,), b"b")


def test_cifar_pickles_with_oversized_or_object_arrays_are_refused_before_allocating(tmp_path: Path) -> None:
    import pickle

    import numpy as np
    import pytest

    from distillistic.data.cifar import cifar_spec, load_pickle
    from distillistic.errors import DataError

    spec = cifar_spec("cifar10")
    good = tmp_path / "good"
    good.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2))
    assert load_pickle(good, spec)["data"].shape == (2, 3072)
    huge = tmp_path / "huge"
    huge.write_bytes(pickle.dumps({"data": _HugeArray(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"asks to load numpy._reconstruct of \(1000000000000,\)"):
        load_pickle(huge, spec)
    objects = tmp_path / "objects"
    objects.write_bytes(pickle.dumps({"data": np.array([None, 1], dtype=object), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="asks to load numpy arrays of dtype 'object'"):
        load_pickle(objects, spec)


def test_a_mistyped_cifar_data_root_is_never_created(tmp_path: Path) -> None:
    root = tmp_path / "cifar-typo"
    code, text = run_argv(["train", "--dataset", "cifar10", "--data-root", str(root), "--model", "mlp", "--epochs",
                           "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert code == 2
    assert text == (f"distillistic: error: data folder '{root}' does not exist; check the path, or create it to "
                    "download CIFAR-10 into it\n")
    assert not root.exists()
    assert not (tmp_path / "run").exists()
