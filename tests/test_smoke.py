"""End-to-end: a short baseline run on synthetic data learns and writes every file of the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillistic import Config, train


@pytest.mark.e2e
def test_two_epoch_baseline_on_synthetic_learns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(Config(algo="baseline", dataset="synthetic", model="cnn", epochs=2, batch_size=32, lr=3e-3,
                          out=str(out), progress=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["epoch"] for r in train_rows] == [1, 2]
    assert train_rows[1]["loss"] < train_rows[0]["loss"]
    test = result.summary["models"]["student"]["test"]
    assert test["top1"] > 0.5  # 10 classes: chance is 0.1
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["temperature"] is None  # a baseline reads no T
    assert any((out / "tensorboard").iterdir())
