"""The teacher-output store: a warm store replaces the teacher exactly; a foreign or damaged one is never used."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from distillistic import Config, train
from distillistic.cli import main
from distillistic.core.signals import StepInputs
from distillistic.data.datasets import TensorSource
from distillistic.data.loader import EpochSampler, Loader
from distillistic.data.views import Views
from distillistic.teachers import cache as teachers_mod
from distillistic.teachers.store import FULL_MAX_CLASSES, TOP_K, Codec, TeacherStore
from distillistic.training.checkpoint import load

KD = {"algo": "kd", "dataset": "synthetic", "synthetic_samples": 192, "image_size": 12, "model": "cnn",
      "teacher": "cnn", "teacher_weights": "random", "augment": "randaugment", "epochs": 2, "batch_size": 32,
      "data_seed": 7, "progress": False, "tensorboard": False}


@pytest.fixture
def teacher_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images the teacher's forward sees, in every run of the test."""
    seen: list[int] = []
    original = teachers_mod.build_teacher

    def counting(cfg: Config, info: Any, trainer: Any) -> Any:
        model, source = original(cfg, info, trainer)
        model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
        return model, source

    monkeypatch.setattr(teachers_mod, "build_teacher", counting)
    return seen


def run(tmp_path: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """Train one run; return its training losses per epoch, final weights and summary."""
    out = tmp_path / name
    result = train(Config(**(KD | {"out": str(out)} | overrides)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["loss"], r["kd"]) for r in rows if r["split"] == "train"]
    weights = load(out / "checkpoints" / "last.pt")["models"]["student"]
    return {"losses": losses, "weights": weights, "summary": result.summary}


def same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["losses"] == b["losses"]
    assert a["weights"].keys() == b["weights"].keys()
    for name, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][name]), name
    assert a["summary"]["models"] == b["summary"]["models"]


def store_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


@pytest.mark.e2e
def test_warm_store_replaces_the_teacher_exactly(tmp_path: Path, teacher_calls: list[int]) -> None:
    store = tmp_path / "store"
    live = run(tmp_path, "live", teacher_store="off")
    assert sum(teacher_calls) > 0
    teacher_calls.clear()
    cold = run(tmp_path, "cold", teacher_store=str(store))
    cold_calls = sum(teacher_calls)
    teacher_calls.clear()
    warm = run(tmp_path, "warm", teacher_store=str(store))
    assert cold_calls > 0
    assert teacher_calls == []  # neither training nor the teacher's own evaluation ran the teacher
    names = {p.name for p in store_files(store)}
    assert names == {"epoch-0000.safetensors", "epoch-0001.safetensors", "val.safetensors", "test.safetensors"}
    same_run(live, cold)
    same_run(live, warm)
    assert warm["summary"]["models"]["teacher"]["test"] == live["summary"]["models"]["teacher"]["test"]


@pytest.mark.e2e
def test_store_is_shared_by_other_students_seeds_and_temperatures(tmp_path: Path, teacher_calls: list[int]) -> None:
    store = tmp_path / "store"
    teacher = tmp_path / "teacher.safetensors"  # a teacher from a file: --seed only changes the student
    from safetensors.torch import save_file

    from distillistic.models.builders import build_model

    torch.manual_seed(0)
    save_file(build_model("cnn", 10, 1, 12).state_dict(), str(teacher))
    base = {"teacher_weights": str(teacher), "teacher_store": str(store), "epochs": 1,
            "allow_weak_teacher": True}  # random weights from a file
    run(tmp_path, "first", **base)
    teacher_calls.clear()
    other = base | {"seed": 3, "temperature": 4.0, "alpha": 0.7, "model": "mlp"}
    warm = run(tmp_path, "other", **other)
    assert teacher_calls == []
    live = run(tmp_path, "other-live", **(other | {"teacher_store": "off"}))
    same_run(warm, live)


@pytest.mark.e2e
@pytest.mark.parametrize("change", [{"teacher_seed": 5}, {"data_seed": 8}, {"augment": "none"},
                                    {"synthetic_samples": 160}],
                         ids=["other-teacher", "other-data-seed", "other-transform", "other-data"])
def test_mismatched_store_is_not_used(tmp_path: Path, teacher_calls: list[int], change: dict[str, Any]) -> None:
    store = tmp_path / "store"
    run(tmp_path, "first", teacher_store=str(store), epochs=1)
    teacher_calls.clear()
    other = run(tmp_path, "other", teacher_store=str(store), epochs=1, **change)
    assert sum(teacher_calls) > 0  # nothing of the first run's store fitted: the teacher ran
    live = run(tmp_path, "other-live", teacher_store="off", epochs=1, **change)
    same_run(other, live)


def _entry_files(store: Path) -> dict[str, Path]:
    return {p.name: p for p in store_files(store)}


@pytest.mark.e2e
def test_foreign_file_in_place_is_refused(tmp_path: Path, teacher_calls: list[int],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A file copied from another entry (another teacher) to where this run looks is not read."""
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    run(tmp_path, "a", teacher_store=str(store_a), teacher_seed=5)
    run(tmp_path, "b", teacher_store=str(store_b))
    for name, path in _entry_files(store_a).items():  # overwrite b's files with a's (same names, other key)
        _entry_files(store_b)[name].write_bytes(path.read_bytes())
    teacher_calls.clear()
    with caplog.at_level(logging.WARNING, logger="distillistic"):
        result = run(tmp_path, "b-again", teacher_store=str(store_b))
    assert sum(teacher_calls) > 0
    assert "does not belong here" in caplog.text
    same_run(result, run(tmp_path, "b-live", teacher_store="off"))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_a_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # inside the tensors: only the checksum can tell
    p.write_bytes(bytes(data))


def _wrong_shape(p: Path) -> None:
    import safetensors.torch

    tensors = safetensors.torch.load(p.read_bytes())
    tensors["logits"] = tensors["logits"][:, :5].contiguous()
    p.write_bytes(safetensors.torch.save(tensors))


@pytest.mark.e2e
@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _wrong_shape], ids=["truncated", "corrupt", "shape"])
def test_damaged_store_is_rebuilt_with_a_warning(tmp_path: Path, teacher_calls: list[int], damage: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    live = run(tmp_path, "first", teacher_store=str(store))
    epoch1 = next(p for p in store_files(store) if p.name == "epoch-0001.safetensors")
    damage(epoch1)
    teacher_calls.clear()
    with caplog.at_level(logging.WARNING, logger="distillistic"):
        rebuilt = run(tmp_path, "rebuilt", teacher_store=str(store))
    assert "epoch-0001.safetensors" in caplog.text
    assert "rewritten" in caplog.text
    assert 0 < sum(teacher_calls) <= 192  # only the damaged epoch was recomputed
    same_run(live, rebuilt)
    teacher_calls.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distillistic"):
        run(tmp_path, "after", teacher_store=str(store))
    assert teacher_calls == []
    # nothing about the store (the tiny data's own warnings aside)
    assert [r.message for r in caplog.records if "small-data" not in r.getMessage()] == []


@pytest.mark.e2e
def test_manifest_of_another_entry_empties_the_folder(tmp_path: Path, teacher_calls: list[int],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    run(tmp_path, "first", teacher_store=str(store), epochs=1)
    manifest = next(p for p in store.glob("*/manifest.json"))
    manifest.write_text(json.dumps({"teacher": "someone else's"}))
    teacher_calls.clear()
    with caplog.at_level(logging.WARNING, logger="distillistic"):
        run(tmp_path, "again", teacher_store=str(store), epochs=1)
    assert "does not match this run" in caplog.text
    assert sum(teacher_calls) > 0
    assert json.loads(manifest.read_text())["teacher"]["arch"] == "cnn"


@pytest.mark.e2e
def test_cross_quality_warm_store_never_makes_the_full_view_for_the_teacher(
        tmp_path: Path, teacher_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    cq = {"teacher_store": str(store), "student_resolution": 6, "epochs": 1}
    live = run(tmp_path, "first", **cq)
    sizes: list[int] = []
    original = Views.get

    def spy(self: Views, size: int | None, channels: int) -> torch.Tensor:
        sizes.append(size or self.size)
        return original(self, size, channels)

    monkeypatch.setattr(Views, "get", spy)
    teacher_calls.clear()
    warm = run(tmp_path, "warm", **cq)
    assert teacher_calls == []
    assert set(sizes) == {6}  # only the students' downscaled view was asked for
    same_run(live, warm)


# --- units ---------------------------------------------------------------------------------------------


def test_codec_keeps_all_logits_for_small_k_and_top_k_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    small = torch.randn(4, FULL_MAX_CLASSES, generator=g)
    assert torch.equal(Codec(FULL_MAX_CLASSES).decode(Codec(FULL_MAX_CLASSES).encode(small)), small)
    k = 1000
    logits = torch.randn(4, k, generator=g) * 5
    codec = Codec(k)
    parts = codec.encode(logits)
    assert parts["values"].dtype == torch.float16
    assert parts["values"].shape == (4, TOP_K)
    back = codec.decode(parts)
    top = logits.topk(TOP_K, dim=1).indices
    assert torch.allclose(back.gather(1, top), logits.gather(1, top), atol=1e-2)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    expected_rest = (logits * rest).sum(1) / (k - TOP_K)
    assert torch.allclose(back[rest].view(4, -1), expected_rest[:, None].expand(4, k - TOP_K), atol=1e-5)
    assert codec.check(parts, 4) is None
    assert codec.check(parts, 5) is not None


def _tiny_store(folder: Path, n: int = 64) -> tuple[TeacherStore, Loader]:
    source = TensorSource(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n) % 4)
    loader = Loader(source, EpochSampler(source.labels, 16, data_seed=1, shuffle=True), 4, True, 1)
    return TeacherStore(folder, {"entry": 1}, {"views": 1}, Codec(4), {"train": loader}, torch.device("cpu")), loader


def _inputs(index: torch.Tensor, epoch: int = 0) -> StepInputs:
    return StepInputs(Views(torch.zeros(len(index), 1, 4, 4), False), torch.zeros(len(index), dtype=torch.long),
                      [], 4, epoch, index)


def test_two_writers_of_one_epoch_merge_instead_of_losing_samples(tmp_path: Path) -> None:
    """Two processes filling the same entry (sweep shards): each file written is complete, none is lost."""
    a, loader = _tiny_store(tmp_path)
    b, _ = _tiny_store(tmp_path)
    batches = list(loader.sampler.batches(0))
    logits = torch.randn(64, 4)
    for idx in batches[:2]:  # a sees the first half of the epoch, b the second, then a crashes
        a.record(_inputs(idx), logits[idx])
    for idx in batches:
        b.record(_inputs(idx), logits[idx])
    a.flush()
    b.flush()
    assert b.stats["written"] == 1
    assert a.stats["written"] == 0
    c, _ = _tiny_store(tmp_path)
    for idx in batches:
        got = c.fetch(_inputs(idx))
        assert got is not None
        assert torch.equal(got, logits[idx])
    assert c.fetch(_inputs(batches[0], epoch=1)) is None  # an epoch nobody completed


def test_incomplete_epoch_is_never_written(tmp_path: Path) -> None:
    store, loader = _tiny_store(tmp_path)
    batches = list(loader.sampler.batches(0))
    for idx in batches[:-1]:
        store.record(_inputs(idx), torch.randn(len(idx), 4))
    store.flush()
    assert store_files(tmp_path) == []
    store.record(_inputs(batches[-1]), torch.randn(16, 4))
    assert store_files(tmp_path) == []  # recording writes nothing: flush() does, outside the step
    store.flush()
    assert [p.name for p in store_files(tmp_path)] == ["epoch-0000.safetensors"]
    store.flush()
    assert store.stats["written"] == 1  # once


def test_a_training_step_writes_no_file(tmp_path: Path) -> None:
    """The store records a whole epoch's teacher outputs during the steps and writes its file only when the loop
    flushes it, at the epoch's end: no training step touches the disk."""
    from distillistic.training import setup
    from distillistic.training.engine import TrainMeters, train_step
    from distillistic.training.run import build_task
    from distillistic.training.runtime import resolve_runtime

    cfg = setup.resolve(Config(**(KD | {"out": str(tmp_path / "run"), "teacher_store": str(tmp_path / "store"),
                                        "threads": 1, "device": "cpu"})))
    rt = resolve_runtime(cfg)
    try:
        task, _ = build_task(cfg, rt)
        meters, loader = TrainMeters(task), task.loaders["train"]
        written = [p for p in store_files(tmp_path / "store") if p.name.startswith("epoch-")]
        assert written == []
        for step, batch in enumerate(task.views.prepare(loader.epoch(0))):
            train_step(task, batch, step / len(loader) / cfg.epochs, meters)
            assert [p for p in store_files(tmp_path / "store") if p.name.startswith("epoch-")] == [], step
        assert step == len(loader) - 1  # the whole epoch was recorded
        task.objective.teaching.flush()  # what the loop does at the epoch's end
        assert [p.name for p in store_files(tmp_path / "store")] == ["epoch-0000.safetensors"]
    finally:
        rt.close()


@pytest.mark.e2e
def test_store_flags_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--algo", "kd", "--dataset", "synthetic", "--model", "cnn", "--teacher", "cnn",
            "--teacher-weights", "random", "--epochs", "1", "--batch-size", "64", "--no-progress"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([*args, "--out", str(tmp_path / "r1"), "--teacher-store", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--teacher-store" in err
    assert "is a file" in err
    assert not (tmp_path / "r1" / "summary.json").exists()
    assert main([*args, "--out", str(tmp_path / "r2"), "--teacher-store", str(tmp_path / "s")]) == 0
    assert store_files(tmp_path / "s")
    assert main([*args, "--out", str(tmp_path / "r3"), "--no-teacher-store"]) == 0
    assert json.loads((tmp_path / "r3" / "summary.json").read_text())["status"] == "completed"
    import yaml

    assert yaml.safe_load((tmp_path / "r3" / "config.yaml").read_text())["teacher_store"] == "off"
