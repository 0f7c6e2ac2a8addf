"""Ranks that disagree under torchrun (Gloo on the CPU, 2 processes): every rank checks at start that it holds
rank 0's resolved config and data, and a bad input on one rank stops every rank with one line (exit 2), instead
of a run of two different trainings, or ranks waiting for a rank that has already exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distillistic

# Each rank runs the CLI on the arguments; those prefixed RANK1: only on rank 1 (as a node given other flags).
LAUNCH = """import os, sys
from distillistic.cli import main
args = [a.replace("RANK1:", "") for a in sys.argv[1:] if os.environ["RANK"] == "1" or not a.startswith("RANK1:")]
sys.exit(main(args))
"""
TIMING = {"seconds", "images_per_second", "train_seconds", "train_images_per_second", "epoch_seconds", "costs",
          "train_cost", "train_flops", "teacher_flops"}  # as tests/test_resume.py leaves out
TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs",
        "1", "--batch-size", "16", "--no-progress", "--no-tensorboard"]


def _torchrun(tmp_path: Path, *args: str) -> tuple[int, dict[int, str]]:
    """Two ranks on ``args``: the launcher's exit code and each rank's own stderr."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "launch.py").write_text(LAUNCH)
    logs = tmp_path / "logs"
    src = str(Path(distillistic.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLISTIC_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--redirects",
           "2", "--log-dir", str(logs), str(tmp_path / "launch.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    return proc.returncode, errs


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(("rank1", "line"), [
    (["--lr", "0.01"], "distillistic: error: rank 1 of 2 holds another config than rank 0 (lr: 0.001 -> 0.01); "
                       "every rank stops: give every rank the same config"),
    (["--lr", "0"], "distillistic: error: rank 1 of 2: config key 'lr' = 0.0 is not allowed: a number > 0 (every "
                    "rank stops: give every rank the same, valid input)"),
], ids=["another-lr", "bad-lr"])
def test_one_rank_given_another_or_a_bad_lr_stops_every_rank_with_one_line(tmp_path: Path, rank1: list[str],
                                                                          line: str) -> None:
    code, errs = _torchrun(tmp_path, "train", *TINY, "--out", str(tmp_path / "run"), *(f"RANK1:{a}" for a in rank1))
    assert code != 0
    assert sorted(errs) == [0, 1]
    for rank, text in errs.items():
        assert text == line + "\n", (rank, text)
    assert not (tmp_path / "run").exists()  # refused before the run directory


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_resumed_torchrun_run_writes_the_metrics_of_an_uninterrupted_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped (SIGTERM) in the middle of epoch 1 and resumed, both under torchrun: last.pt held rank 0's partial
    training sums only and every rank restored them, so epoch 1's training row counted rank 0's first steps
    twice and rank 1's never. Now the checkpoint holds every rank's sums and rank 0 alone restores them."""
    import json

    args = ["train", *TINY, "--synthetic-samples", "192", "--epochs", "2", "--checkpoint-every", "3", "--log-every",
            "1"]
    code, errs = _torchrun(tmp_path / "a", *args, "--out", str(tmp_path / "ref"))
    assert code == 0, errs
    monkeypatch.setenv("DISTILLISTIC_FAULT", "step:7:TERM")  # both ranks, at their 7th step (of 8 per epoch)
    code, errs = _torchrun(tmp_path / "b", *args, "--out", str(tmp_path / "run"))
    monkeypatch.delenv("DISTILLISTIC_FAULT")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted", errs
    code, errs = _torchrun(tmp_path / "c", *args, "--out", str(tmp_path / "run"), "--resume")
    assert code == 0, errs
    assert "resuming" in errs[0]

    def rows(run: str) -> list[dict[str, object]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if k not in TIMING} for r in lines]

    assert rows("run") == rows("ref")
    assert len(rows("ref")) == 4  # train and val rows of 2 epochs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_rank_reading_other_data_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    """Rank 1 reads a copy of the IDX files with one pixel changed (another --data-root: a machine setting, so
    the configs agree): the data's checksums differ and every rank stops before training."""
    import numpy as np

    from bad_inputs import write_idx

    images = np.random.default_rng(0).integers(0, 255, (120, 8, 8), np.uint8)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_idx(tmp_path / name / "t10k-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / name / "t10k-labels-idx1-ubyte.gz", (np.arange(120) % 3).astype(np.uint8))
        images[0, 0, 0] ^= 1  # the second copy differs by one pixel
    code, errs = _torchrun(tmp_path / "launch", "train", *TINY, "--dataset", "mnist", "--data-root",
                           str(tmp_path / "a"), f"RANK1:--data-root=RANK1:{tmp_path / 'b'}", "--out",
                           str(tmp_path / "run"))
    assert code != 0
    assert sorted(errs) == [0, 1]
    for text in errs.values():
        lines = text.strip().splitlines()
        assert len(lines) == 1, text
        assert lines[0].startswith("distillistic: error: rank 1 of 2 holds another copy of the data than rank 0 ("), \
            text
        assert lines[0].endswith("); every rank stops: give every rank the same copy of the data"), text
    assert not (tmp_path / "run").exists()
