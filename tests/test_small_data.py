"""Small data is told: few optimizer steps per epoch, few validation samples per class, strong augmentation on
a small folder; and a weak teacher gets advice that fits how it was obtained."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from distillistic.config import Config
from distillistic.teachers.check import weak_teacher_advice
from distillistic.training.small_data import small_data_warnings


def test_a_60_image_folder_at_the_defaults_gets_three_warnings() -> None:
    cfg = Config(dataset="imagefolder", augment="randaugment", batch_size=128)
    val = torch.tensor([0, 0, 1, 1, 2, 2])  # 2 per class
    lines = small_data_warnings(cfg, steps_per_epoch=1, train_size=42, val_labels=val, num_classes=3, files=True)
    assert len(lines) == 3
    assert "make 1 optimizer step per epoch" in lines[0]
    assert "--batch-size (e.g. 5)" in lines[0]
    assert "a class has 2 validation samples" in lines[1]
    assert "--augment cifar" in lines[2]


def test_enough_data_warns_nothing() -> None:
    cfg = Config(dataset="mnist", augment="randaugment", batch_size=64)
    val = torch.arange(1000) % 10
    assert small_data_warnings(cfg, steps_per_epoch=47, train_size=3000, val_labels=val, num_classes=10,
                               files=False) == []


def test_weak_teacher_advice_fits_how_it_was_obtained() -> None:
    trained = weak_teacher_advice("train", SimpleNamespace(teacher_epochs=2, epochs=5))
    assert "--teacher-epochs, now 2" in trained
    assert "--teacher-epochs" not in weak_teacher_advice("from a file", SimpleNamespace())
    assert "checkpoint" in weak_teacher_advice("from a file", SimpleNamespace())
    assert "--teacher-init imagenet" in weak_teacher_advice("imagenet", SimpleNamespace())
