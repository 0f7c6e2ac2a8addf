"""The Python API talks like the CLI (through logging, silenced by quiet) and returns typed scores that print
in % as the tables do."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import _forked_cli as forked_cli
from distillistic.config import Config
from distillistic.runs.result import RunResult, Score


def test_scores_print_as_the_tables_do(tmp_path: Path) -> None:
    summary = {"status": "completed", "models": {
        "student0": {"test": {"top1": 0.9, "ece": 0.02, "nll": 0.3}},
        "student1": {"test": {"top1": 0.8, "ece": 0.04, "nll": 0.5}},
        "ensemble": {"test": {"top1": 0.91, "ece": 0.01, "nll": 0.25}}},
        "cohort_mean": {"test": {"top1": 0.85, "ece": 0.03, "nll": 0.4}}}
    result = RunResult(tmp_path, Config(), summary)
    assert result.student == Score("cohort mean", 0.85, 0.03, 0.4)
    assert str(result.student) == "cohort mean: test top-1 85.00 %, ECE 3.00 %, NLL 0.400"
    assert set(result.scores) == {"student0", "student1", "ensemble"}
    assert "  ensemble: test top-1 91.00 %, ECE 1.00 %, NLL 0.250" in str(result).splitlines()
    stopped = RunResult(tmp_path, Config(), {"status": "interrupted", "reason": "stopped by a signal"})
    assert stopped.student is None
    assert str(stopped).endswith("interrupted (stopped by a signal)")
    assert math.isnan(Score("x", 0.5, math.nan, math.nan).ece)


@pytest.mark.e2e
@pytest.mark.parametrize("quiet", [False, True])
def test_the_api_talks_on_stderr_and_quiet_silences_it(tmp_path: Path, quiet: bool) -> None:
    code = ("from distillistic import train\n"
            f"r = train(algo='baseline', dataset='digits', model='mlp', epochs=1, out={str(tmp_path / 'r')!r}, "
            f"tensorboard=False, progress=False, quiet={quiet})\nprint(r.student)")
    (tmp_path / "api.py").write_text(code)  # run as `python api.py`, in a process forked with torch imported
    done = forked_cli.run([], env=forked_cli.cli_env(DISTILLISTIC_CACHE=str(tmp_path / "cache")),
                          script=str(tmp_path / "api.py"), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("student: test top-1 ")
    epochs = [line for line in done.stderr.splitlines() if line.startswith("epoch 1/1 student: ")]
    assert len(epochs) == (0 if quiet else 1), done.stderr
    assert ("start: baseline" in done.stderr) is not quiet
