"""Your own model and data for distillistic: a tiny ConvNet and a map-style dataset, no files needed.

Use it from the command line (run from this folder, or put it on PYTHONPATH):

    distillistic train --model custom_model:build_net --dataset custom_model:load_data --epochs 5 --out runs/mine
    distillistic train --plugins examples/custom_model.py --model my_net --teacher my_net_wide \
        --dataset custom_model:load_data --algo kd --out runs/mine_kd

or from a config file (``plugins:`` is imported before the config is checked)::

    plugins: [examples/custom_model.py]
    model: my_net
    dataset: custom_model:load_data

or from Python: ``import custom_model`` registers ``my_net``, ``my_net_wide`` and ``stripes``, then
``distillistic.train(model="my_net", dataset="stripes", out="runs/mine")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distillistic import register_dataset, register_model


def build_net(num_classes: int, in_channels: int, image_size: int, width: int = 16) -> nn.Module:
    """Any ``nn.Module`` mapping images ``[B, in_channels, image_size, image_size]`` to logits ``[B, num_classes]``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


class Stripes(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Grey 12x12 images of stripes; the class is the stripes' period (2, 3 or 4 px) plus noise."""

    classes = ("period2", "period3", "period4")

    def __init__(self, n: int = 900, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        phase = torch.randint(0, 4, (n,), generator=g)
        cols = torch.arange(12)
        period = (self.labels + 2)[:, None]
        rows = ((cols[None, :] + phase[:, None]) % period < period // 2 + 1).float()
        self.images = (rows[:, None, None, :].expand(n, 1, 12, 12) * 0.8
                       + 0.2 * torch.rand(n, 1, 12, 12, generator=g)).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])  # float [C, H, W] in [0, 1] (or uint8, a PIL image)


def load_data(root: Path | None) -> torch.utils.data.Dataset[tuple[torch.Tensor, int]]:
    """``--data-root`` arrives as ``root``; return one dataset (carved train/val/test), a mapping
    ``{"train": ..., "test": ...}`` (val carved from train) or the path of an image folder."""
    return Stripes()


register_model("my_net", build_net)
register_model("my_net_wide", lambda k, c, s: build_net(k, c, s, width=48))
register_dataset("stripes", load_data)
