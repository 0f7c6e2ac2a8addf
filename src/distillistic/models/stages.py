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

__all__ = ["EMBEDDING", "attach_taps", "class_head", "feature_shapes", "stage_map", "stage_modules",
           "stage_names"]


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


def stage_modules(arch: str, model: nn.Module) -> dict[str, nn.Module]:
    """``{stage: submodule}`` of model ``arch``'s spatial stages, shallow to deep (no ``embedding``)."""
    stages, _ = stage_map(arch, model)
    return {name: model.get_submodule(qualified) for name, qualified in stages.items()}


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


@torch.no_grad()
def class_head(arch: str, model: nn.Module, stage: str, channels: int, size: int, role: str = "model") -> nn.Linear:
    """The linear layer that classifies the global average of ``stage``'s map (class-activation methods).

    Checked on one eval-mode forward of a random ``size`` px batch: the classifier's input must be the spatial
    mean of the stage's map ``[B, C, H, W]`` and the classifier one ``nn.Linear`` (a dropout beside it is
    fine), so that ``W·F`` at each position is the class activation map whose average is the logit (less its
    bias). A model with a norm or an activation between the stage and the pooling is refused with a UserError.
    """
    _, name = stage_map(arch, model)
    linears = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
    param = next(model.parameters())
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)).to(param)
    with attach_taps(arch, model, [stage, EMBEDDING], role) as taps:
        eval_forward(model, x)
        got = taps.pop()
    f, e = got[stage], got[EMBEDDING].flatten(1)
    pooled = f.dim() == 4 and tuple(e.shape) == tuple(f.shape[:2]) and torch.allclose(f.mean((2, 3)), e, 1e-4, 1e-5)
    if len(linears) != 1 or not pooled:
        raise UserError(f"the {role} '{arch}' does not classify the global average of its {stage} map with one "
                        "linear layer, so its class activation maps are not defined; use a cnn, ResNet, "
                        "MobileNetV2 or EfficientNet")
    return linears[0]
