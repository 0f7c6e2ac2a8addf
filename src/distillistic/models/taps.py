"""Forward-hook taps: a model's intermediate features, captured during its ordinary forward.

:class:`Taps` hooks named submodules of a plain ``nn.Module`` and keeps what they return during one forward
(with the autograd graph: a student's features are differentiated through; the caller runs a teacher under
``no_grad``). Hooks live on the submodules, so they keep firing after the model is wrapped by
``DistributedDataParallel`` or ``torch.compile`` (the wrapper calls the same submodules; compiled graphs
honour hooks registered before compilation). :func:`torchvision_stages` names the stages of the project's
architectures.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn

from distillistic.errors import UserError

__all__ = ["TORCHVISION_STAGES", "Taps", "torchvision_stages"]

EMBEDDING = "embedding"


class Taps:
    """Captures ``{stage name: submodule output}`` and, optionally, ``"embedding"``: the INPUT of a module.

    ``stages``: ``{name: qualified module name}`` (``model.get_submodule`` names, e.g. ``"layer1"``,
    ``"features.6"``). ``embedding``: the qualified name of the classifier whose input is wanted (a forward
    pre-hook), e.g. ``"fc"``: the pooled penultimate features ``[B, D]`` used by RKD and CRD.

    Each key is captured once per forward; a second capture before :meth:`pop` raises, since it means a
    forward whose features nobody read (or a module called twice in one forward, whose first output would be
    lost). Captured tensors are the module's own outputs, not copies: a later in-place operation on them (an
    ``inplace=True`` ReLU applied to a tapped BatchNorm's output) would change them, so tap block outputs.
    """

    def __init__(self, model: nn.Module, stages: Mapping[str, str], embedding: str | None = None) -> None:
        if embedding is not None and EMBEDDING in stages:
            raise ValueError(f"the stage name '{EMBEDDING}' is reserved for the classifier's input")
        self._store: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, qualified in stages.items():
            module = model.get_submodule(qualified)
            self._handles.append(module.register_forward_hook(self._output_hook(name)))
        if embedding is not None:
            module = model.get_submodule(embedding)
            self._handles.append(module.register_forward_pre_hook(self._input_hook(EMBEDDING)))
        self.names = (*stages, *([EMBEDDING] if embedding is not None else []))

    def _keep(self, name: str, value: object) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tap '{name}' captured a {type(value).__name__}, not a tensor")
        if name in self._store:
            raise RuntimeError(f"tap '{name}' fired twice without pop(): call Taps.pop() after every forward")
        self._store[name] = value

    def _output_hook(self, name: str) -> typing.Callable[[nn.Module, typing.Any, typing.Any], None]:
        def hook(module: nn.Module, args: typing.Any, output: typing.Any) -> None:
            self._keep(name, output)

        return hook

    def _input_hook(self, name: str) -> typing.Callable[[nn.Module, typing.Any], None]:
        def hook(module: nn.Module, args: typing.Any) -> None:
            self._keep(name, args[0])

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """The captured tensors (``{name: tensor}`` in the order of capture), and a cleared store."""
        out, self._store = self._store, {}
        return out

    def remove(self) -> None:
        """Removes every hook and drops what was captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store = {}

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.remove()


_RESNETS = ("resnet", "wide_resnet", "resnext", "cifar_resnet")
# Embedding = the input of this module: the pooled features before any dropout of the head.
_HEADS = {"resnet": "fc", "wide_resnet": "fc", "resnext": "fc", "cifar_resnet": "fc", "mobilenet_v2": "classifier",
          "mobilenet_v3": "classifier", "efficientnet_b": "classifier", "convnext_": "classifier.2", "cnn": "fc",
          "mlp": "fc"}
TORCHVISION_STAGES = tuple(_HEADS)  # the architecture prefixes that torchvision_stages knows


def _family(arch: str) -> str:
    for prefix in sorted(_HEADS, key=len, reverse=True):  # "cifar_resnet" before "resnet"
        if arch.startswith(prefix):
            return prefix
    raise UserError(f"no feature stages known for model '{arch}'; known families: {', '.join(TORCHVISION_STAGES)}")


def _probe_strides(model: nn.Module, candidates: list[str], size: int = 64) -> dict[str, int]:
    """``{candidate: stride}`` from one eval-mode forward of a ``size`` x ``size`` zero image (BN stats kept)."""
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    param = next(model.parameters())
    x = torch.zeros(1, first_conv.in_channels, size, size, dtype=param.dtype, device=param.device)
    with Taps(model, {c: c for c in candidates}) as taps, torch.no_grad():
        eval_forward(model, x)
        shapes = taps.pop()
    return {c: size // shapes[c].shape[-1] for c in candidates}


def torchvision_stages(arch: str, model: nn.Module) -> tuple[dict[str, str], str]:
    """``({"stride<s>": module name}, classifier name)`` for a model of the project's registry.

    Stages are the last block at each resolution, keyed by their stride relative to the input, so a student
    and a teacher of different families pair by key (AT, FitNets). ResNets: ``layer1..layer4`` (strides
    4-32, or 1-8 with the ``cifar_`` stem); MobileNet V2/V3, EfficientNet, ConvNeXt: the children of
    ``features`` found by one probe forward (MobileNetV2: ``features.1, 3, 6, 13, 18``; ConvNeXt: ``features.1,
    3, 5, 7``); the project's ``cnn``: the children of ``features`` before each max-pool and the last one;
    ``mlp``: no stage, only the embedding. The classifier name is for ``Taps(embedding=...)``: ``fc``, or the
    ``classifier`` head (its input is the pooled features before dropout; for ConvNeXt ``classifier.2``, after
    its LayerNorm).
    """
    family = _family(arch)
    if family == "mlp":
        return {}, _HEADS[family]
    if family in _RESNETS:
        candidates = [f"layer{i}" for i in range(1, 5)]
    else:
        features = typing.cast(nn.Sequential, model.get_submodule("features"))
        candidates = [f"features.{i}" for i in range(len(features))]
    strides = _probe_strides(model, candidates)
    last: dict[int, str] = {}
    for name in candidates:  # candidates run in forward order; a later one at the same stride replaces
        last[strides[name]] = name
    if family == "cnn":  # the max-pools themselves are not stages: the block before each one is
        last = {s: n for s, n in last.items() if not isinstance(model.get_submodule(n), nn.MaxPool2d)}
    return {f"stride{s}": name for s, name in sorted(last.items())}, _HEADS[family]


def eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    """One forward of ``x`` in eval mode (BatchNorm statistics untouched), every module's mode restored after:
    the dry run that shapes adapters and finds stages leaves the model as it was."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
