"""``--peer-views independent``: each student of a cohort reads its own augmented view of every sample.

View ``m`` of a sample is keyed by ``(data_seed, epoch, index, m)`` (view 0 is the shared view, bit for bit),
so the views are reproducible, a resume sees the same ones (tests/test_resume.py) and no RNG state is kept.
Captured from the students' real forwards in a training step: with ``shared`` every student reads the same
tensor, with ``independent`` each its own, in memory and from image files, and at ``--student-resolution``
(each student's downscale of its own crop); PCL's temporal mean teachers read their student's view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from _util import run_cli
from distillistic import Config
from distillistic.data.augment import SampleKeys, crop_box, sample_hash
from distillistic.training import setup
from distillistic.training.engine import TrainMeters, train_step
from distillistic.training.run import build_task
from distillistic.training.runtime import resolve_runtime

BASE: dict[str, Any] = dict(algo="kdcl", students=2, dataset="synthetic", synthetic_samples=96, image_size=12,
                            augment="randaugment", model="cnn", epochs=1, batch_size=16, progress=False,
                            tensorboard=False, num_workers=0, threads=1, device="cpu", quiet=True, out="unused")


def _capture(module: nn.Module, into: list[Tensor]) -> None:
    module.register_forward_pre_hook(lambda m, args: into.append(args[0].detach().clone()))


def _first_step_inputs(**overrides: Any) -> tuple[list[Tensor], list[Tensor], Any]:
    """What each student (and each model the objective keeps, e.g. PCL's mean teachers) read in step 1."""
    cfg = setup.resolve(Config(**(BASE | overrides)))
    rt = resolve_runtime(cfg)
    try:
        task, _ = build_task(cfg, rt)
        seen: list[list[Tensor]] = [[] for _ in task.students]
        kept: list[list[Tensor]] = [[] for _ in task.members]
        for s, into in zip(task.students, seen):
            _capture(s.raw, into)
        for m, into in zip(task.members, kept):
            _capture(m.raw, into)
        batch = next(iter(task.views.prepare(task.loaders["train"].epoch(0))))
        for s in task.students:
            s.model.train()
        train_step(task, batch, 0.0, TrainMeters(task))
        return [x[0] for x in seen], [x[0] for x in kept if x], batch
    finally:
        rt.close()


def _differ_per_sample(a: Tensor, b: Tensor) -> int:
    return int((a != b).flatten(1).any(1).sum())


def test_shared_views_are_identical_and_independent_views_differ_per_student() -> None:
    shared, _, _ = _first_step_inputs(students=3)
    assert all(torch.equal(shared[0], x) for x in shared[1:])
    own, _, batch = _first_step_inputs(students=3, peer_views="independent")
    assert torch.equal(own[0], shared[0])  # student 0 reads view 0: the shared view, bit for bit
    n = len(batch.index)
    for i in range(3):
        for j in range(i + 1, 3):
            assert _differ_per_sample(own[i], own[j]) > n // 2, (i, j)  # most samples drew other operations


def test_independent_views_are_a_pure_function_of_the_key() -> None:
    """Again from scratch: the same views; and view v > 0 draws from other hashes than view 0."""
    a, _, _ = _first_step_inputs(peer_views="independent")
    b, _, _ = _first_step_inputs(peer_views="independent")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    index = torch.arange(64)
    assert torch.equal(sample_hash(1, 2, index, 3), sample_hash(1, 2, index, 3, view=0))
    assert not torch.equal(sample_hash(1, 2, index, 3), sample_hash(1, 2, index, 3, view=1))
    assert not torch.equal(SampleKeys(1, 2, index, 1).randint(0, 14), SampleKeys(1, 2, index, 2).randint(0, 14))
    assert crop_box(100, 80, (1, 2, 3)) == crop_box(100, 80, (1, 2, 3), view=0)
    assert any(crop_box(100, 80, (1, 2, i)) != crop_box(100, 80, (1, 2, i), view=1) for i in range(8))


def test_cross_quality_students_read_the_downscale_of_their_own_view() -> None:
    own, _, batch = _first_step_inputs(peer_views="independent", student_resolution=6)
    assert own[0].shape[-1] == own[1].shape[-1] == 6
    assert _differ_per_sample(own[0], own[1]) > len(batch.index) // 2
    shared, _, _ = _first_step_inputs(student_resolution=6)
    assert torch.equal(own[0], shared[0])


def test_pcl_mean_teachers_read_their_students_views() -> None:
    own, means, _ = _first_step_inputs(algo="pcl", peer_views="independent")
    assert len(means) == 2
    for student_view, mean_view in zip(own, means):
        assert torch.equal(student_view, mean_view)
    assert not torch.equal(own[0], own[1])


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_files_give_each_student_its_own_crop_even_without_augmentation(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    files = dict(dataset="imagefolder", data_root=str(root), image_size=12, split_fractions=(0.75, 0.125, 0.125),
                 batch_size=8)
    shared, _, _ = _first_step_inputs(**files, augment="none")
    assert torch.equal(shared[0], shared[1])
    own, _, batch = _first_step_inputs(**files, augment="none", peer_views="independent")
    assert torch.equal(own[0], shared[0])
    assert _differ_per_sample(own[0], own[1]) > len(batch.index) // 2
    assert batch.crops is not None
    assert batch.crops.shape[1] == 2
    # with RandAugment on top: view 1 is view 1's crop, augmented with view 1's keys
    aug, _, batch = _first_step_inputs(**files, peer_views="independent")
    assert _differ_per_sample(aug[0], aug[1]) > len(batch.index) // 2


def test_evaluation_reads_one_unaugmented_view() -> None:
    cfg = setup.resolve(Config(**(BASE | {"peer_views": "independent"})))
    rt = resolve_runtime(cfg)
    try:
        task, _ = build_task(cfg, rt)
        batch = next(iter(task.loaders["val"].epoch(0)))
        plain = (batch.images.float() / 255 - task.views.mean) / task.views.std
        assert torch.equal(task.views(batch, train=False).get(None, 1), plain)
    finally:
        rt.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--peer-views", "both"], "'peer_views' = 'both' is not allowed: one of shared, independent"),
    (["--algo", "kd", "--teacher", "cnn", "--teacher-weights", "random", "--peer-views", "independent"],
     "config key 'peer_views' is not read by algo kd (it is read by dml, dml_e, kdcl, pcl)"),
    (["--algo", "dml", "--peer-views", "independent"], "shared with --augment none on in-memory data"),
])
def test_bad_peer_views_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(["train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", "--no-progress",
                          "--no-tensorboard", *args, "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert len(err) == 1, err
    assert message in err[0]
    assert not (tmp_path / "run").exists()
