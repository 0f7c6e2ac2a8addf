"""Sweeps: grid expansion, sharding, the state of a cell's folder, failures, and a real interrupted sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillistic import config as config_mod
from distillistic.cli import main
from distillistic.config import Config
from distillistic.errors import UserError
from distillistic.experiments.grid import cell_name, expand, parse_shard, shard
from distillistic.experiments.sweep import cell_state, run_sweep
from distillistic.runs.rundir import RunDir
from distillistic.training import setup
from distillistic.training.run import RunResult

BASE = {"dataset": "synthetic", "model": "cnn", "epochs": 1, "batch_size": 64, "progress": False,
        "tensorboard": False}


def test_grid_is_the_product_of_its_axes_seed_major() -> None:
    plan = expand({**BASE, "grid": {"algo": ["baseline", "tfkd"], "alpha": [0.3, 0.7], "seed": [0, 1, 2]}})
    assert len(plan.cells) == 2 * 2 * 3
    assert [c.index for c in plan.cells] == list(range(12))
    # every combination exactly once, seeds outermost: the first four cells are one complete comparison
    combos = {(c.settings["algo"], c.settings["alpha"], c.config.seed) for c in plan.cells}
    assert len(combos) == 12
    # an axis crossed with a method that does not read it reaches only the cells that do
    assert {c.config.alpha for c in plan.cells if c.config.algo == "baseline"} == {None}
    assert {c.config.alpha for c in plan.cells if c.config.algo == "tfkd"} == {0.3, 0.7}
    assert [c.config.seed for c in plan.cells] == [0] * 4 + [1] * 4 + [2] * 4
    assert plan.cells[0].name == "algo=baseline,alpha=0.3,seed=0"
    assert plan.cells[5].name == "algo=baseline,alpha=0.7,seed=1"
    assert plan.cells[5].settings == {"algo": "baseline", "alpha": 0.7, "seed": 1}
    assert all(c.config.epochs == 1 and c.config.dataset == "synthetic" for c in plan.cells)


def test_variants_are_crossed_with_the_grid_and_override_the_base() -> None:
    plan = expand({**BASE, "temperature": 4, "variants": {
        "smoothed": {"algo": "tfkd", "virtual_smooth": True, "temperature": 20},
        "calibrated": {"algo": "tfkd"}}, "grid": {"seed": [3, 4]}})
    names = [c.name for c in plan.cells]
    assert names == ["smoothed,seed=3", "calibrated,seed=3", "smoothed,seed=4", "calibrated,seed=4"]
    by_name = {c.name: c.config for c in plan.cells}
    assert by_name["smoothed,seed=4"].virtual_smooth is True
    assert by_name["smoothed,seed=4"].temperature == 20.0
    assert by_name["calibrated,seed=3"].virtual_smooth is False
    assert by_name["calibrated,seed=3"].temperature == 4.0  # the base value where a variant does not set it
    assert plan.cells[0].settings == {"variant": "smoothed", "seed": 3}


def test_variants_alone_make_a_sweep_and_overrides_replace_base_keys() -> None:
    plan = expand({**BASE, "variants": {"a": {"algo": "baseline"}, "b": {"algo": "dml", "students": 2}}},
                  overrides={"epochs": 3})
    assert [c.name for c in plan.cells] == ["a", "b"]
    assert all(c.config.epochs == 3 for c in plan.cells)


def test_cell_names_are_readable_file_names() -> None:
    assert cell_name(None, {"seed": 1, "algo": "kd", "temperature": 4.0}) == "algo=kd,temperature=4,seed=1"
    assert cell_name("v", {"lr": 0.001, "virtual_smooth": True}) == "v,lr=0.001,virtual_smooth=true"
    long = cell_name(None, {"teacher_weights": "/some/very/long/path/to/a/teacher/checkpoint/best.pt"})
    assert "/" not in long
    assert len(long) <= 48
    plan = expand({**BASE, "grid": {"teacher_weights": ["a/b.pt", "a_b.pt"]}, "algo": "kd", "teacher": "cnn"})
    assert len({c.name for c in plan.cells}) == 2  # collapsed names get a hash each


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_are_disjoint_and_cover_the_sweep(n: int) -> None:
    cells = expand({**BASE, "grid": {"alpha": [0.1, 0.2, 0.3], "seed": [0, 1]}}).cells
    parts = [shard(cells, i, n) for i in range(n)]
    names = [c.name for part in parts for c in part]
    assert sorted(names) == sorted(c.name for c in cells)  # covering, nothing twice
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1  # balanced
    assert [c.index for c in parts[0]] == list(range(0, len(cells), n))  # every n-th cell


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "a/b", "-1/3", "1/0"):
        with pytest.raises(UserError, match="i/n with 0 <= i < n"):
            parse_shard(bad)


@pytest.mark.parametrize(("spec", "message"), [
    ({**BASE}, "no 'grid'"),
    ({**BASE, "grid": {"temprature": [1, 2]}}, "unknown config key 'temprature' \\(did you mean 'temperature'"),
    ({**BASE, "grid": {"seed": 3}}, "grid key 'seed' must be a non-empty list"),
    ({**BASE, "grid": {"seed": []}}, "grid key 'seed' must be a non-empty list"),
    ({**BASE, "grid": {"seed": [1, 1]}}, "lists the value 1 twice"),
    ({**BASE, "grid": {"alpha": ["high"]}}, "config key 'alpha' = 'high' is not allowed"),
    ({**BASE, "grid": {"alpha": [0.5, 2.0]}}, "cell 'alpha=2': config key 'alpha' = 2.0"),
    ({**BASE, "grid": ["seed"]}, "'grid' must map config keys to lists"),
    ({**BASE, "grid": {"out": ["a", "b"]}}, "'out' is set by the sweep"),
    ({**BASE, "out": "x", "grid": {"seed": [0]}}, "'out' is set by the sweep"),
    ({**BASE, "variants": {"v": {"seed": 1}}, "grid": {"seed": [0]}}, "sets 'seed', which is also a grid axis"),
    ({**BASE, "variants": {"v": "kd"}}, "variant 'v' must be a mapping"),
    ({**BASE, "variants": {"v": {"algoo": "kd"}}}, "unknown config key 'algoo'"),
])
def test_bad_sweep_files_name_the_problem(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        expand(spec)


def test_overrides_may_not_name_an_axis() -> None:
    with pytest.raises(UserError, match="--set seed: 'seed' is an axis"):
        expand({**BASE, "grid": {"seed": [0, 1]}}, overrides={"seed": 3})


def test_sweep_cli_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "no 'grid'" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({**BASE, "grid": {"seed": [0]}}))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--shard", "3/2"]) == 2
    assert not (tmp_path / "out").exists()  # nothing written for bad input


# --- the state of a cell's folder -------------------------------------------------------------------------


def _write_run(folder: Path, cfg: Config, status: str | None, checkpoint: bool = False) -> None:
    folder.mkdir(parents=True)
    config_mod.save(setup.resolve(cfg.replace(out=str(folder))), folder / "config.yaml")
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status, "reason": "loss is nan"}))
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.pt").write_bytes(b"x")


def test_cell_state_decides_skip_resume_restart_and_conflict(tmp_path: Path) -> None:
    cell = expand({**BASE, "grid": {"seed": [0]}}).cells[0]
    assert cell_state(cell, tmp_path / "absent") == ("new", "")
    (tmp_path / "empty").mkdir()
    assert cell_state(cell, tmp_path / "empty") == ("new", "")
    _write_run(tmp_path / "done", cell.config, "completed")
    assert cell_state(cell, tmp_path / "done") == ("done", "")
    _write_run(tmp_path / "machine", cell.config.replace(device="cpu", threads=1, num_workers=0), "completed")
    assert cell_state(cell, tmp_path / "machine")[0] == "done"  # machine keys do not make another cell
    _write_run(tmp_path / "stopped", cell.config, "interrupted", checkpoint=True)
    assert cell_state(cell, tmp_path / "stopped") == ("resume", "")
    _write_run(tmp_path / "early", cell.config, None)
    assert cell_state(cell, tmp_path / "early") == ("restart", "")
    _write_run(tmp_path / "nan", cell.config, "diverged", checkpoint=True)
    assert cell_state(cell, tmp_path / "nan") == ("diverged", "loss is nan")
    _write_run(tmp_path / "other", cell.config.replace(epochs=5), "completed")
    state, why = cell_state(cell, tmp_path / "other")
    assert state == "conflict"
    assert "epochs" in why
    assert "5" in why


def test_a_conflicting_folder_stops_the_sweep_before_anything_runs(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {**BASE, "grid": {"seed": [0, 1]}}
    cell = expand(spec).cells[1]
    _write_run(tmp_path / cell.name, cell.config.replace(lr=0.5), "completed")
    calls: list[Config] = []
    monkeypatch.setattr("distillistic.training.run.train", lambda cfg: calls.append(cfg))
    with pytest.raises(UserError, match=r"holds a run of another config \(lr: 0.5"):
        run_sweep(spec, tmp_path)
    assert calls == []


# --- running: failures, pass-through, skipping (with a stand-in for train) ---------------------------------


def _fake_train(calls: list[Config], fail: dict[int, Exception]) -> Any:
    def train(cfg: Config) -> RunResult:
        calls.append(cfg)
        if cfg.seed in fail:
            raise fail[cfg.seed]
        out = Path(cfg.out or "")
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(setup.resolve(cfg), out / "config.yaml")
        summary = {"status": "completed"}
        (out / "summary.json").write_text(json.dumps(summary))
        return RunResult(out, cfg, summary)
    return train


def test_failed_cells_are_reported_and_the_sweep_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[Config] = []
    monkeypatch.setattr("distillistic.training.run.train", _fake_train(calls, {
        1: UserError("data folder 'x' does not exist"), 2: RuntimeError("CUDA out of memory")}))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "grid": {"seed": [0, 1, 2, 3]}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--out", str(out), "--wandb"]) == 1
    assert [c.seed for c in calls] == [0, 1, 2, 3]  # went on after the failures
    assert all(c.wandb for c in calls)  # --wandb reaches every cell
    assert [Path(c.out or "").name for c in calls] == ["seed=0", "seed=1", "seed=2", "seed=3"]
    printed = capsys.readouterr().out
    assert "2 completed, 2 failed" in printed
    assert "FAILED seed=1: data folder 'x' does not exist" in printed
    assert "FAILED seed=2: RuntimeError: CUDA out of memory" in printed
    assert "RuntimeError" in (out / "seed=2" / "error.txt").read_text()  # the traceback is kept
    plan = json.loads((out / "plan.json").read_text())
    assert [c["name"] for c in plan["cells"]] == ["seed=0", "seed=1", "seed=2", "seed=3"]
    assert plan["cells"][0]["config"]["eval_batch_size"] is not None  # resolved configs
    assert yaml.safe_load((out / "sweep.yaml").read_text())["grid"] == {"seed": [0, 1, 2, 3]}
    # again: the completed cells are skipped, only the failed ones are tried
    calls.clear()
    monkeypatch.setattr("distillistic.training.run.train", _fake_train(calls, {}))
    assert main(["sweep", str(cfg), "--out", str(out)]) == 0
    assert [c.seed for c in calls] == [1, 2]
    assert not (out / "seed=2" / "error.txt").exists()
    assert "2 completed, 2 skipped" in capsys.readouterr().out


def test_fail_fast_and_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Config] = []
    monkeypatch.setattr("distillistic.training.run.train", _fake_train(calls, {0: UserError("bad")}))
    spec = {**BASE, "grid": {"seed": [0, 1, 2, 3]}}
    result = run_sweep(spec, tmp_path / "a", fail_fast=True)
    assert [o.status for o in result.outcomes] == ["failed"]
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr("distillistic.training.run.train", _fake_train(calls, {}))
    result = run_sweep(spec, tmp_path / "b", shard_spec=(1, 2))
    assert [c.seed for c in calls] == [1, 3]
    assert [o.status for o in result.outcomes] == ["completed", "completed"]
    result = run_sweep(spec, tmp_path / "b", dry_run=True)
    assert [(o.cell.name, o.message) for o in result.outcomes] == [
        ("seed=0", "new"), ("seed=1", "done"), ("seed=2", "new"), ("seed=3", "done")]


# --- a real sweep, interrupted and continued -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_interrupted_sweep_continues_with_only_the_missing_work(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {**BASE, "epochs": 2, "synthetic_samples": 256, "grid": {"seed": [0, 1]}}
    out = tmp_path / "sweep"
    original = RunDir.after_step

    def stop_in_epoch_two(self: RunDir, task: Any, progress: Any, meters: Any) -> bool:
        if progress.epoch == 1 and progress.step == 1:
            self.stop_requested = True  # what SIGINT/SIGTERM do
        return original(self, task, progress, meters)

    with monkeypatch.context() as m:
        m.setattr(RunDir, "after_step", stop_in_epoch_two)
        first = run_sweep(spec, out)
    assert [o.status for o in first.outcomes] == ["interrupted"]  # the sweep stops with the interrupted cell
    cell0, cell1 = out / "seed=0", out / "seed=1"
    assert json.loads((cell0 / "summary.json").read_text())["status"] == "interrupted"
    assert (cell0 / "checkpoints" / "last.pt").is_file()
    assert not cell1.exists()

    second = run_sweep(spec, out)
    assert [(o.cell.name, o.status) for o in second.outcomes] == [("seed=0", "completed"), ("seed=1", "completed")]
    manifest = json.loads((cell0 / "manifest.json").read_text())
    assert len(manifest["resumed_at"]) == 1  # cell 0 continued from its checkpoint, not from scratch
    rows = [json.loads(line) for line in (cell0 / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["split"] == "train"] == [1, 2]  # each epoch once
    assert json.loads((cell1 / "manifest.json").read_text())["resumed_at"] == []

    third = run_sweep(spec, out)
    assert [o.status for o in third.outcomes] == ["skipped", "skipped"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(("name", "cells"), [("fashion_mnist.yaml", 30), ("imagenet_cross_quality.yaml", 27),
                                             ("fashion_mnist_small.yaml", 18), ("cross_quality_small.yaml", 27)])
def test_ready_configs_expand_into_valid_cells(name: str, cells: int) -> None:
    plan = expand(config_mod.read_yaml(CONFIGS / name), source=name)  # validates every cell's config
    assert len(plan.cells) == cells
    algos = {c.config.algo for c in plan.cells}
    if "cross_quality" in name:
        assert algos == {"baseline", "kd", "dml"}
        assert len({c.config.student_resolution for c in plan.cells}) == 3
    else:
        assert algos == {"baseline", "kd", "dml", "dml_e", "tfkd"}
        tfkd = {(c.config.virtual_smooth, c.config.temperature) for c in plan.cells if c.config.algo == "tfkd"}
        assert tfkd == {(True, 20.0), (False, 1.0)}  # Tf-KD smoothed at T 20, calibrated at T 1
    if name == "imagenet_cross_quality.yaml":
        batch = {c.config.student_resolution: c.config.batch_size for c in plan.cells}
        assert batch == {42: 1024, 84: 1024, 168: 512}
