"""The student with its input pipeline inside: uint8 images ``[B, C, H, W]`` in, logits ``[B, K]`` out.

The steps are those of a run's evaluation (:mod:`distillistic.data`), in the same order and with the same
arithmetic, so that an export reproduces the run's test logits:

1. resize to the run's input size ``S`` (bilinear, antialiased), rounded back to whole pixel values as the
   in-memory datasets are stored (an identity for images already ``S`` x ``S``);
2. ``(x / 255 - mean) / std`` with the data's statistics;
3. the student's own view: a downscale to its resolution (cross-quality students), grayscale expanded to
   3 channels for a model that takes RGB, the model's own normalisation (a timm model).

Image files (an image folder) were read by the run as ``Resize(S * 256 / 224) + CenterCrop(S)``; that crop
is not in the graph (``Inputs.center_crop``): :mod:`distillistic.deploy.predict` applies it before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Inputs:
    """What a student reads: the data's size, channels and statistics, then its own view of them."""

    image_size: int  # S: the run's input size
    channels: int  # the data's channels (1 or 3): the graph's input channels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view_size: int | None = None  # the student's resolution (cross-quality), None: S
    model_channels: int | None = None  # what the model takes, None: ``channels``
    norm: Norm | None = None  # the model's own (mean, std), None: the data's
    center_crop: bool = False  # image files: Resize(S * 256 / 224) + CenterCrop(S) before the graph

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inputs:
        norm = data.get("norm")
        return cls(int(data["image_size"]), int(data["channels"]), tuple(data["mean"]), tuple(data["std"]),
                   data.get("view_size"), data.get("model_channels"),
                   (tuple(norm[0]), tuple(norm[1])) if norm else None, bool(data.get("center_crop", False)))


class Preprocessed(nn.Module):
    """``model`` behind the run's evaluation pipeline; ``class_names`` name its outputs."""

    def __init__(self, model: nn.Module, inputs: Inputs, class_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.inputs, self.class_names = model, inputs, tuple(class_names)
        self.register_buffer("mean", torch.tensor(inputs.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(inputs.std).view(1, -1, 1, 1), persistent=False)
        norm = inputs.norm or (inputs.mean, inputs.std)  # the model's own statistics (used only with norm)
        self.register_buffer("norm_mean", torch.tensor(norm[0]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(norm[1]).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, K]`` of uint8 (or 0-255 float) images ``[B, C, H, W]``, any ``H`` and ``W``."""
        s, inp = self.inputs.image_size, self.inputs
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        x = F.interpolate(images.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = (x.round().clamp(0, 255) / 255 - mean) / std
        if inp.view_size is not None and inp.view_size != s:
            x = F.interpolate(x, size=(inp.view_size, inp.view_size), mode="bilinear", antialias=True,
                              align_corners=False)
        wanted = inp.model_channels or inp.channels
        if wanted != inp.channels:
            x = x.expand(-1, wanted, -1, -1)  # grayscale -> RGB
        if inp.norm is not None:  # as data.views.renormalise: one affine map per channel, same arithmetic
            m, sd = self.get_buffer("norm_mean"), self.get_buffer("norm_std")
            x = x * (std / sd) + (mean - m) / sd
        return self.model(x)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, K]`` of uint8 images (eval mode)."""
        self.eval()
        return self.forward(images).float().softmax(dim=1)
