"""One-line warnings for data too small for the settings: few optimizer steps per epoch, few validation
samples per class, and strong default augmentation on a small image folder (docs/small-data.md)."""

from __future__ import annotations

import logging

import torch

from distillistic.config import Config

log = logging.getLogger("distillistic")
FEW_STEPS = 5  # optimizer steps per epoch below which a run barely trains
FEW_VAL = 5  # validation samples of a class below which its accuracy (and model selection) is noise
SMALL_FOLDER = 2000  # training images below which RandomResizedCrop + RandAugment is too strong by default


def small_data_warnings(cfg: Config, steps_per_epoch: int, train_size: int, val_labels: torch.Tensor,
                        num_classes: int, files: bool) -> list[str]:
    """The warnings that apply (each one line), also logged; none when resuming (they were said at the start)."""
    lines: list[str] = []
    if cfg.resume:
        return lines
    if steps_per_epoch < FEW_STEPS:
        lines.append(f"warning: {train_size} training samples at --batch-size {cfg.batch_size} make "
                     f"{steps_per_epoch} optimizer step{'s' * (steps_per_epoch != 1)} per epoch; a model barely "
                     f"trains so: lower --batch-size (e.g. {min(32, max(4, train_size // 8))}) or raise --epochs "
                     "(docs/small-data.md)")
    counts = torch.bincount(val_labels.cpu(), minlength=num_classes)
    fewest = int(counts.min()) if len(counts) else 0
    if fewest < FEW_VAL:
        lines.append(f"warning: a class has {fewest} validation sample{'s' * (fewest != 1)} (--val-fraction, or "
                     "--split-fractions for one folder carved in three); its val accuracy, and the best-on-val "
                     "epoch, are noise at this size: raise --val-fraction or add images (docs/small-data.md)")
    if files and cfg.augment == "randaugment" and train_size < SMALL_FOLDER and cfg.dataset == "imagefolder":
        lines.append(f"warning: {train_size} training images with the default augmentation (RandomResizedCrop + "
                     "RandAugment), which is strong for so few: consider --augment cifar (crop and flip) or "
                     "--augment none, and a pretrained backbone (docs/small-data.md)")
    for line in lines:
        log.warning("%s", line)
    return lines
