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
from _torchrun import FOLDER, job, outcome
from test_resume import TIMING  # the keys that differ between identical runs

TINY = ["--dataset", "synthetic", "--synthetic-samples", "96", "--image-size", "8", "--model", "mlp", "--epochs",
        "1", "--batch-size", "16", "--no-progress", "--no-tensorboard"]


def _torchrun(tmp_path: Path, *args: str) -> tuple[int, dict[int, str]]:
    """Two ranks of ``python -m distillistic ARGS``: the launcher's exit code and each rank's own stderr."""
    tmp_path.mkdir(exist_ok=True)
    logs = tmp_path / "logs"
    src = str(Path(distillistic.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLISTIC_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--redirects",
           "2", "--log-dir", str(logs), "-m", "distillistic", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    return proc.returncode, errs


LINES = {
    "another-lr": (["--lr", "0.01"], "distillistic: error: rank 1 of 2 holds another config than rank 0 (lr: 0.001 -> "
                                     "0.01); every rank stops: give every rank the same config"),
    "bad-lr": (["--lr", "0"], "distillistic: error: rank 1 of 2: config key 'lr' = 0.0 is not allowed: a number > 0 "
                              "(every rank stops: give every rank the same, valid input)"),
}
# A refusal ends the run on every rank with exit 2 and leaves the process group as it was, so these runs share
# one torchrun launch with the other tests' runs (_torchrun.py), as does the uninterrupted reference run.
RANK1_JOBS = {name: job(f"rank1-{name}",
                        "test_reliability3_ranks.py::test_one_rank_given_another_or_a_bad_lr_stops_every_rank_with_one_line",
                        "train", *TINY, "--out", f"{FOLDER}/run", *(f"RANK1:{a}" for a in rank1), early=True)
              for name, (rank1, _) in LINES.items()}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LINES))
def test_one_rank_given_another_or_a_bad_lr_stops_every_rank_with_one_line(request: pytest.FixtureRequest,
                                                                          name: str) -> None:
    got = outcome(request, RANK1_JOBS[name].name)
    assert got.codes == {0: 2, 1: 2}, got.tail()
    for rank, text in got.err.items():
        assert text == LINES[name][1] + "\n", (rank, text)
    assert not (got.folder / "run").exists()  # refused before the run directory


RESUME_ARGS = ["train", *TINY, "--synthetic-samples", "192", "--epochs", "2", "--checkpoint-every", "3",
               "--log-every", "1"]
RESUME_REFERENCE = job("resume-reference",
                       "test_reliability3_ranks.py::test_a_resumed_torchrun_run_writes_the_metrics_of_an_uninterrupted_one",
                       *RESUME_ARGS, "--out", f"{FOLDER}/ref")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_resumed_torchrun_run_writes_the_metrics_of_an_uninterrupted_one(tmp_path: Path,
                                                                           request: pytest.FixtureRequest,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped (SIGTERM) in the middle of epoch 1 and resumed, both under torchrun: last.pt held rank 0's partial
    training sums only and every rank restored them, so epoch 1's training row counted rank 0's first steps
    twice and rank 1's never. Now the checkpoint holds every rank's sums and rank 0 alone restores them. The
    stopped and the resumed runs have launches of their own; the reference, the batch's (:mod:`_torchrun`)."""
    import json

    ref = outcome(request, RESUME_REFERENCE.name)
    assert ref.codes == {0: 0, 1: 0}, ref.tail()
    monkeypatch.setenv("DISTILLISTIC_FAULT", "step:7:TERM")  # both ranks, at their 7th step (of 8 per epoch)
    code, errs = _torchrun(tmp_path / "b", *RESUME_ARGS, "--out", str(tmp_path / "run"))
    monkeypatch.delenv("DISTILLISTIC_FAULT")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted", errs
    code, errs = _torchrun(tmp_path / "c", *RESUME_ARGS, "--out", str(tmp_path / "run"), "--resume")
    assert code == 0, errs
    assert "resuming" in errs[0]

    def rows(run: Path) -> list[dict[str, object]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(r).items() if k not in TIMING} for r in lines]

    assert rows(tmp_path / "run") == rows(ref.folder / "ref")
    assert len(rows(ref.folder / "ref")) == 4  # train and val rows of 2 epochs


def _two_copies(folder: Path) -> None:
    """Two copies of a small IDX test split in ``folder``/a and /b that differ by one pixel."""
    import numpy as np

    from bad_inputs import write_idx

    images = np.random.default_rng(0).integers(0, 255, (120, 8, 8), np.uint8)
    for name in ("a", "b"):
        (folder / name).mkdir()
        write_idx(folder / name / "t10k-images-idx3-ubyte.gz", images)
        write_idx(folder / name / "t10k-labels-idx1-ubyte.gz", (np.arange(120) % 3).astype(np.uint8))
        images[0, 0, 0] ^= 1  # the second copy differs by one pixel


OTHER_DATA = job("rank1-other-data",
                 "test_reliability3_ranks.py::test_a_rank_reading_other_data_stops_every_rank_with_one_line",
                 "train", *TINY, "--dataset", "mnist", "--data-root", f"{FOLDER}/a",
                 f"RANK1:--data-root=RANK1:{FOLDER}/b", "--out", f"{FOLDER}/run", prepare=_two_copies,
                 early=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_rank_reading_other_data_stops_every_rank_with_one_line(request: pytest.FixtureRequest) -> None:
    """Rank 1 reads a copy of the IDX files with one pixel changed (another --data-root: a machine setting, so
    the configs agree): the data's checksums differ and every rank stops before training."""
    got = outcome(request, OTHER_DATA.name)
    assert got.codes == {0: 2, 1: 2}, got.tail()
    for text in got.err.values():
        lines = text.strip().splitlines()
        assert len(lines) == 1, text
        assert lines[0].startswith("distillistic: error: rank 1 of 2 holds another copy of the data than rank 0 ("), \
            text
        assert lines[0].endswith("); every rank stops: give every rank the same copy of the data"), text
    assert not (got.folder / "run").exists()
