"""Every registry model's named stages, by one naming scheme: ``stage1 .. stageN`` and ``embedding``.

``stage<i>`` is the last block at the ``i``-th resolution of the model, in forward order (finest first), so a
student and a teacher pair by name whatever their families (AT, FitNets); ``embedding`` is the input of the
classifier, the pooled penultimate features ``[B, D]`` (RKD, CRD). torchvision models and the small ``cnn``
are mapped from :func:`~distillistic.models.taps.torchvision_stages` (its ``stride<s>`` keys in increasing
stride become ``stage1, stage2, ...``); the CIFAR zoo uses :data:`~distillistic.models.cifar.CIFAR_STAGES`
(already ``stage<i>``); ``mlp`` has only the embedding.

A method asks for stages by these names; a name the model does not have, or a model with no declared stages,
is a :class:`~distillistic.errors.UserError` naming the model's stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distillistic.errors import UserError
from distillistic.models.cifar import CIFAR_CLASSIFIER, CIFAR_STAGES
from distillistic.models.taps import EMBEDDING, Taps, eval_forward, torchvision_stages

__all__ = ["EMBEDDING", "attach_taps", "feature_shapes", "stage_map", "stage_names"]


def stage_map(arch: str, model: nn.Module) -> tuple[dict[str, str], str]:
    """``({"stage1": qualified module name, ...}, classifier name)`` for registry model ``arch``."""
    if arch in CIFAR_STAGES:
        return dict(CIFAR_STAGES[arch]), CIFAR_CLASSIFIER[arch]
    try:
        strides, classifier = torchvision_stages(arch, model)
    except UserError:
        raise UserError(f"model '{arch}' declares no feature stages, so feature methods cannot tap it; use a "
                        "ResNet, MobileNet, EfficientNet, ConvNeXt, cnn, mlp or CIFAR-zoo model") from None
    ordered = sorted(strides.items(), key=lambda kv: int(kv[0].removeprefix("stride")))
    return {f"stage{i}": qualified for i, (_, qualified) in enumerate(ordered, start=1)}, classifier


def stage_names(arch: str, model: nn.Module) -> tuple[str, ...]:
    """The stage names model ``arch`` offers: ``("stage1", ..., "embedding")``."""
    stages, _ = stage_map(arch, model)
    return (*stages, EMBEDDING)


def attach_taps(arch: str, model: nn.Module, wanted: Sequence[str], role: str = "model") -> Taps:
    """Forward hooks on the plain ``model`` capturing the ``wanted`` stages (register before DDP/compile).

    Raises :class:`UserError` naming the model's stages when one of ``wanted`` is not among them.
    """
    stages, classifier = stage_map(arch, model)
    offered = (*stages, EMBEDDING)
    for name in wanted:
        if name not in offered:
            raise UserError(f"the {role} '{arch}' has no stage '{name}'; its stages are {', '.join(offered)}")
    return Taps(model, {n: stages[n] for n in wanted if n != EMBEDDING},
                embedding=classifier if EMBEDDING in wanted else None)


@torch.no_grad()
def feature_shapes(arch: str, model: nn.Module, wanted: Sequence[str], channels: int, size: int,
                   role: str = "model") -> dict[str, tuple[int, ...]]:
    """``{stage: shape}`` of the ``wanted`` stages for a batch of 2 ``size`` px images (one dry forward).

    The forward runs in eval mode on zeros, so BatchNorm statistics and every mode are left as they were.
    """
    param = next(model.parameters())
    x = torch.zeros(2, channels, size, size, dtype=param.dtype, device=param.device)
    with attach_taps(arch, model, wanted, role) as taps:
        eval_forward(model, x)
        captured = taps.pop()
    return {name: tuple(captured[name].shape) for name in wanted}
