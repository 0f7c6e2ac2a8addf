"""Born-again's summary states its costs, as every run's does: its student's (the last generation's model) and
its training FLOPs, every generation's summed (the report's cost columns and Pareto front read them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _util import tiny
from distillistic import train


@pytest.mark.e2e
def test_a_born_again_run_sums_its_generations_training_and_states_its_students_cost(tmp_path: Path) -> None:
    out = tmp_path / "ban"
    summary = train(tiny(out, algo="ban", generations=2)).summary
    gens = [json.loads((out / f"gen{g}" / "summary.json").read_text()) for g in (1, 2)]
    assert all(g["train_flops"] > 0 for g in gens)
    assert summary["train_flops"] == gens[0]["train_flops"] + gens[1]["train_flops"]
    assert gens[1]["train_flops"] > gens[0]["train_flops"]  # generation 2 also runs its teacher (generation 1)
    assert summary["costs"] == {"student": gens[1]["costs"]["student"]}
    assert summary["costs"]["student"]["cost"]["params"] > 0
    assert json.loads((out / "summary.json").read_text())["train_flops"] == summary["train_flops"]
