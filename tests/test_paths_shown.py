"""Every path distillistic prints is absolute: a run's folder, its cached teacher, the teacher store, the summary."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from _util import run_cli
from distillistic.errors import shown


def test_shown_is_absolute_with_home_and_dots_folded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shown("runs/a") == str(tmp_path / "runs" / "a")
    assert shown(Path("runs/../b")) == str(tmp_path / "b")
    assert shown("~/.cache/x") == str(tmp_path / "home" / ".cache" / "x")
    assert shown(tmp_path / "c") == str(tmp_path / "c")


@pytest.mark.e2e
def test_a_run_with_a_relative_out_and_cache_prints_every_path_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="distillistic"):
        rc, out, _ = run_cli(["train", "--algo", "kd", "--dataset", "digits", "--model", "mlp", "--teacher", "mlp",
                              "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "128", "--threads", "1",
                              "--num-workers", "0", "--cache-dir", "cache", "--out", "runs/kd", "--no-tensorboard"],
                             capsys)
    assert rc == 0
    run, cache = str(tmp_path / "runs" / "kd"), str(tmp_path / "cache")
    lines = [r.getMessage() for r in caplog.records]
    text = "\n".join(lines)
    assert re.search(rf"teacher: training mlp \(1 epochs\) in {re.escape(cache)}{os.sep}teachers{os.sep}mlp-", text)
    assert f"teacher store: {cache}{os.sep}teacher-store{os.sep}" in text
    assert f"steps -> {run}" in text
    assert f"\n{run} | kd on digits" in text
    assert out.startswith(f"{run}: student top1 ")
    for line in [*lines, out]:  # no path printed as typed: 'runs/kd' or 'cache/' only inside an absolute one
        for typed in ("runs/kd", "cache/"):
            for at in (m.start() for m in re.finditer(re.escape(typed), line)):
                assert line[:at].endswith(str(tmp_path) + os.sep), line
