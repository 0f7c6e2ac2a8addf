"""Checkpoints: atomic writes, safe loading (a malicious pickle never runs), safetensors export, mismatches."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distillistic import cli
from distillistic.errors import CheckpointError, UserError
from distillistic.models.builders import build_model
from distillistic.training.checkpoint import (
    FORMAT_VERSION,
    atomic_write,
    load,
    load_weights,
    read_state_dict,
    remove_stale_temporaries,
    save,
    state_dict_hash,
)

TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs", "1",
        "--batch-size", "16", "--device", "cpu", "--no-tensorboard", "--no-progress"]


class Payload:
    """Unpickling this runs ``os.system('touch MARKER')``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _malicious(path: Path, marker: Path, legacy: bool) -> Path:
    obj = {"format": "distillistic-checkpoint", "version": 1, "models": {"student": Payload(marker)}}
    if legacy:  # a bare pickle, as torch.save(..., _use_new_zipfile_serialization=False) or pickle.dump
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only the file does create the marker (so its absence below means something)."""
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "x.pt", marker, legacy=False)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("route", ["resume", "teacher-weights", "student-weights", "teacher-run-dir", "export"])
def test_a_malicious_pickle_is_refused_without_running_it(route: str, legacy: bool, tmp_path: Path,
                                                          finished_run: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    if route in ("resume", "teacher-run-dir", "export"):  # a run directory whose checkpoint was swapped
        import shutil

        shutil.copytree(finished_run, run)
        target = run / "checkpoints" / ("last.pt" if route == "resume" else "best-student.pt")
        _malicious(target, marker, legacy)
    else:
        target = _malicious(tmp_path / "evil.pt", marker, legacy)
    argv = {
        "resume": ["train", *TINY, "--out", str(run), "--resume"],
        "teacher-weights": ["train", *TINY, "--algo", "kd", "--teacher", "mlp", "--teacher-weights", str(target),
                            "--out", str(tmp_path / "kd")],
        "student-weights": ["train", *TINY, "--student-weights", str(target), "--out", str(tmp_path / "s")],
        "teacher-run-dir": ["train", *TINY, "--algo", "kd", "--teacher", "mlp", "--teacher-weights", str(run),
                            "--out", str(tmp_path / "kd")],
        "export": ["export", str(run)],
    }[route]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(target) in err[0]
    assert ("holds the Python object" in err[0]) or ("a safe load (weights_only) can read" in err[0])
    assert not marker.exists()


def test_no_torch_load_without_weights_only_in_the_package() -> None:
    """Every ``torch.load`` call in the package passes ``weights_only=True``; nothing calls pickle.load(s)."""
    import ast

    import distillistic

    calls = 0
    for path in Path(distillistic.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("pickle.load", "pickle.loads", "torch.serialization.load"), f"{path.name}: {name}"
            if name == "torch.load":
                calls += 1
                safe = [k for k in node.keywords if k.arg == "weights_only"]
                assert safe, f"{path.name}:{node.lineno}: torch.load without weights_only"
                assert isinstance(safe[0].value, ast.Constant), f"{path.name}:{node.lineno}"
                assert safe[0].value.value is True, f"{path.name}:{node.lineno}"
    assert calls >= 1


def test_atomic_write_keeps_the_previous_file_until_the_new_one_is_complete(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match=f"cannot write '{path}': disk full; "):  # one line naming the path
        atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*.tmp"))  # the failed writer removed its temporary file


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / ".last.pt.999999999.tmp"  # no such pid
    live = tmp_path / f".last.pt.{os.getppid()}.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists()


def test_state_dict_hash_identifies_weights() -> None:
    torch.manual_seed(0)
    a = build_model("cnn", 10, 1, 8).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert state_dict_hash(a) == state_dict_hash(b)
    b["fc.bias"][0] += 1e-7
    assert state_dict_hash(a) != state_dict_hash(b)
    assert state_dict_hash({"w": torch.zeros(2, dtype=torch.bfloat16)}) != state_dict_hash({"w": torch.zeros(2)})


def test_a_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.pt"
    save({"models": {"student": {"w": torch.zeros(1)}}}, path)
    obj = load(path)
    assert obj["version"] == FORMAT_VERSION
    obj["version"] = FORMAT_VERSION + 1
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer than"):
        read_state_dict(path)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is damaged or not a PyTorch file (EOFError)"),
    (b"hello world", "is damaged or not a PyTorch file (KeyError)"),
    (random.Random(0).randbytes(512), "is not a file a safe load (weights_only) can read (pickle opcode 205)"),
])
def test_damaged_files_get_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value).startswith(f"checkpoint '{path}' {message}")
    assert "\n" not in str(info.value)


def test_a_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    save({"models": {"student": build_model("mlp", 10, 1, 8).state_dict()}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"is damaged or not a PyTorch file \(RuntimeError\)"):
        read_state_dict(path)


def test_class_count_and_architecture_mismatches_are_explained() -> None:
    ten = build_model("cnn", 10, 1, 8).state_dict()
    with pytest.raises(CheckpointError, match="has a 10-class head but the dataset has 3 classes"):
        load_weights(build_model("cnn", 3, 1, 8), ten, "w.pt", "cnn")
    with pytest.raises(CheckpointError, match="does not fit architecture 'mlp'"):
        load_weights(build_model("mlp", 10, 1, 8), ten, "w.pt", "mlp")
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'cnn': features.0.0.weight has shape"):
        load_weights(build_model("cnn", 10, 3, 8), ten, "w.pt", "cnn")  # 1-channel weights, 3-channel data
    model = build_model("cnn", 10, 1, 8)
    load_weights(model, {f"module.{k}": v for k, v in ten.items()}, "ddp.pt", "cnn")  # DDP prefixes are fine
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ten.items())


@pytest.mark.e2e
def test_export_writes_safetensors_that_load_back_as_weights(finished_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exported"
    assert cli.main(["export", str(finished_run), "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["student.safetensors"]
    assert capsys.readouterr().out.split() == [str(files[0])]
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["arch"]) == "mlp"
    assert json.loads(meta["num_classes"]) == 10
    assert json.loads(meta["config"])["model"] == "mlp"
    best = load(finished_run / "checkpoints" / "best-student.pt")["models"]["student"]
    state, got = read_state_dict(files[0])
    assert got["arch"] == "mlp"
    assert state.keys() == best.keys()
    assert all(torch.equal(state[k], best[k]) for k in best)
    # ... refused when the files exist, unless --overwrite; and usable as student and teacher weights
    assert cli.main(["export", str(finished_run), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(finished_run), "--out", str(out), "--which", "last", "--overwrite"]) == 0
    assert cli.main(["train", *TINY, "--student-weights", str(files[0]), "--out", str(tmp_path / "s")]) == 0
    assert cli.main(["train", *TINY, "--algo", "kd", "--teacher", "mlp", "--teacher-weights", str(files[0]),
                     "--allow-weak-teacher", "--out", str(tmp_path / "kd")]) == 0  # 1 epoch on 96 images: weak
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--model", "cnn", "--student-weights", str(files[0]),
                     "--out", str(tmp_path / "c")]) == 2
    assert "are a mlp but --model is cnn; pass --model mlp" in capsys.readouterr().err
