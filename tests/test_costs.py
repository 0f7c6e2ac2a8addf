"""Costs: FLOP counts against hand-computed and published counts, the counted step leaves training unchanged,
and a run's summary and metrics carry its students' size and speed and the method's training FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from distillistic import Config, train
from distillistic.models.costs import count_flops, forward_cost, percentile, speed
from distillistic.teachers.costs import register_user, teacher_training_cost
from distillistic.training import setup
from distillistic.training.costs import measure_training
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime, rng_state


def test_linear_layer_flops_by_hand() -> None:
    layer = nn.Linear(10, 5)
    x = torch.zeros(3, 10)
    assert count_flops(lambda: layer(x)) == 2 * 3 * 10 * 5  # B * in * out multiply-adds
    x.requires_grad_(True)
    # backward: the input's gradient (B x out x in) and the weight's (out x B x in), each as many again
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 3 * 10 * 5


def test_single_convolution_by_hand() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    cost = forward_cost(conv, (3, 16, 16))
    macs = 8 * 16 * 16 * (3 * 3 * 3)  # every output value: C_in * k * k multiply-adds
    assert cost == {"params": 8 * 3 * 3 * 3 + 8, "flops": 2 * macs, "macs": macs}
    strided = forward_cost(nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=False), (3, 16, 16))
    assert strided["macs"] == 8 * 8 * 8 * 27
    assert strided["params"] == 8 * 27


@pytest.mark.parametrize(("arch", "weights"), [("resnet18", "ResNet18_Weights"), ("resnet50", "ResNet50_Weights")])
def test_resnets_at_224_match_published_counts(arch: str, weights: str) -> None:
    """torchvision's documented GMACs (its weights' ``_ops``: 1.814 and 4.089 for ResNet-18/50 at 224 px).
    ptflops's often quoted 1.82 and 4.11 add the element-wise layers (BN, ReLU, pooling): within 1 %."""
    model = torchvision.models.get_model(arch).to("meta")  # shapes only: nothing is computed
    with torch.no_grad():
        flops = count_flops(lambda: model(torch.zeros(1, 3, 224, 224, device="meta")))
    published = getattr(torchvision.models, weights).IMAGENET1K_V1.meta["_ops"]
    assert flops / 2e9 == pytest.approx(published, abs=5e-4)
    assert flops / 2e9 == pytest.approx({"resnet18": 1.82, "resnet50": 4.11}[arch], rel=0.01)
    assert sum(p.numel() for p in model.parameters()) == {"resnet18": 11_689_512, "resnet50": 25_557_032}[arch]


def test_percentile_is_numpys_linear() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 0.5]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_speed_times_the_asked_calls() -> None:
    out = speed(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), (3, 2, 2), batch=64, calls=30)
    assert out["latency_ms"]["calls"] == 30
    assert out["latency_ms"]["batch"] == 1
    assert 0 < out["latency_ms"]["median"] <= out["latency_ms"]["p90"]
    assert out["throughput_images_per_second"] > 0
    assert out["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        speed(nn.Linear(2, 2), (1, 1, 2), batch=0)


def _task(algo: str, **keys: object) -> tuple[object, object, object]:
    cfg = setup.resolve(Config(algo=algo, dataset="synthetic", model="cnn", epochs=1, batch_size=16,
                               synthetic_samples=96, progress=False, **keys))
    task, extra = build_task(cfg, resolve_runtime(cfg))
    return task, extra, cfg


def _state(task: object) -> list[torch.Tensor]:
    tensors = [t.clone() for s in task.students for t in s.raw.state_dict().values()]  # type: ignore[attr-defined]
    tensors += [t.clone() for t in task.objective.state_dict().values()]  # type: ignore[attr-defined]
    return tensors


def test_counted_step_changes_nothing_and_adds_up() -> None:
    task, extra, _ = _task("baseline")
    size = extra.data.image_size
    before, rng = _state(task), rng_state()
    cost = measure_training(task, [], size)  # type: ignore[arg-type]
    after = _state(task)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(rng["torch"], rng_state()["torch"])
    assert all(not o.state for o in task.optimizers)  # type: ignore[attr-defined]
    forward = forward_cost(task.students[0].raw, (task.students[0].channels, size, size))["flops"]  # type: ignore
    # forward + backward: 2 to 3 forwards per image (the first layer needs no input gradient)
    assert 2 * forward * 16 < cost.step_flops <= 3 * forward * 16
    dml, _, _ = _task("dml", students=2)
    extra_flops = measure_training(dml, [], size).step_flops - 2 * cost.step_flops  # type: ignore[arg-type]
    assert 0 <= extra_flops < 1e-4 * cost.step_flops  # two students' steps, and the peers' small [B, K] products


def test_kd_step_is_the_baseline_step_plus_the_teachers_forward() -> None:
    base, _, _ = _task("baseline")
    kd, extra, _ = _task("kd", teacher="cnn_wide", teacher_weights="random")
    assert extra.teachers is not None
    signals, size = extra.teachers.signals, extra.data.image_size
    cost = measure_training(kd, signals, size)  # type: ignore[arg-type]
    teacher = forward_cost(signals[0].model, (signals[0].channels, size, size))["flops"]
    assert cost.teacher_step_flops == [teacher * 16]
    assert cost.own_step_flops == measure_training(base, [], size).step_flops  # type: ignore[arg-type]


@pytest.mark.e2e
def test_a_counted_run_trains_as_an_uncounted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = dict(algo="dml", students=2, dataset="synthetic", model="cnn", epochs=1, batch_size=16,
                synthetic_samples=96, progress=False, quiet=True)
    counted = train(Config(out=str(tmp_path / "a"), **keys)).summary  # type: ignore[arg-type]
    monkeypatch.setattr("distillistic.training.run.measure_training", lambda *a, **k: None)
    plain = train(Config(out=str(tmp_path / "b"), **keys)).summary  # type: ignore[arg-type]
    assert counted["models"]["student0"]["test"] == plain["models"]["student0"]["test"]
    assert counted["models"]["student1"]["val_best"] == plain["models"]["student1"]["val_best"]
    assert "train_flops" not in plain
    assert counted["train_flops"] > 0


@pytest.mark.e2e
def test_summary_and_metrics_carry_the_costs(tmp_path: Path) -> None:
    out = tmp_path / "kd"
    s = train(Config(algo="kd", teacher="cnn_wide", teacher_weights="train", teacher_epochs=1,
                     allow_weak_teacher=True, dataset="synthetic", model="cnn", epochs=2, batch_size=16,
                     synthetic_samples=96, progress=False, quiet=True, out=str(out))).summary
    student, teacher, tc = s["costs"]["student"]["cost"], s["costs"]["teacher"], s["train_cost"]
    assert student["params"] == sum(p.numel() for p in _task("baseline")[0].students[0].raw.parameters())  # type: ignore
    assert student["macs"] * 2 == student["flops"] > 0
    assert student["latency_ms"]["calls"] >= 30
    assert tc["flops"] == s["train_flops"] == tc["students_step_flops"] * tc["steps"] + tc["teacher_forward_flops"]
    assert tc["teacher_forward_flops"] == tc["teacher_step_flops"][0] * tc["steps"]  # a new store computes all
    own = teacher["training_cost"]
    assert own["train_flops"] > 0
    assert own["shared_by"] == 1
    assert own["note"] == "trained first into the cache"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    flops = [r["train_flops"] for r in rows if r["split"] == "train"]
    assert flops[-1] == s["train_flops"]
    assert flops[0] == s["train_flops"] // 2


def test_teacher_cost_without_a_run_and_shared_runs(tmp_path: Path) -> None:
    assert teacher_training_cost("imagenet", tmp_path, tmp_path)["train_flops"] is None
    folder = tmp_path / "teachers" / "t"
    folder.mkdir(parents=True)
    assert [register_user(folder, tmp_path / r) for r in ("a", "b", "a")] == [1, 2, 2]
    (folder / "summary.json").write_text(json.dumps({"train_flops": 7, "train_seconds": 1.5}))
    cost = teacher_training_cost(str(folder), tmp_path / "c", tmp_path)
    assert cost["train_flops"] == 7
    assert cost["shared_by"] == 3
