"""timm models as students and teachers: ``--model timm/NAME`` (timm is the optional extra ``[timm]``).

A timm model is built by ``timm.create_model(NAME, num_classes=K)`` (with ``img_size`` for the models that
take it, e.g. ViTs, so that a 32 px input gives a valid patch grid) and reads its input normalised with
its own ``pretrained_cfg`` mean and std, whatever the dataset's: with a torchvision model on the other side
of a distillation, each gets the same crop normalised its own way (:meth:`distillistic.data.views.Views.get`).
Pretrained weights come from the Hugging Face hub through timm's own cache; offline they give one clear error.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any

from torch import nn

from distillistic.errors import UserError

PREFIX = "timm/"
EXTRA = "pip install 'distillistic[timm]'"
Norm = tuple[tuple[float, ...], tuple[float, ...]]


def available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm() -> Any:
    if not available():
        raise UserError(f"timm models need the optional package timm, which is not installed: {EXTRA}")
    import timm

    return timm


def timm_name(name: str) -> str:
    return name.removeprefix(PREFIX)


def problem(name: str) -> str | None:
    """Why ``timm/NAME`` cannot be built (timm missing, unknown model), or ``None``."""
    if not available():
        return f"model '{name}' needs the optional package timm, which is not installed: {EXTRA}"
    timm = _timm()
    model = timm_name(name)
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=1)
        hint = f" (did you mean '{PREFIX}{close[0]}'?)" if close else ""
        return f"timm has no model '{model}'{hint}; see timm.list_models() for the names"
    return None


def normalisation(name: str) -> Norm:
    """The mean and std of the model's ``pretrained_cfg`` (ImageNet's for most, 0.5 for many ViTs)."""
    cfg = _timm().models.get_pretrained_cfg(timm_name(name), allow_unregistered=True)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(float(x) for x in cfg.mean), tuple(float(x) for x in cfg.std)


def build(name: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool) -> nn.Module:
    """``timm.create_model`` with a ``num_classes`` head; ``img_size`` where the model takes one."""
    timm, model = _timm(), timm_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels, "pretrained": pretrained}
    try:
        try:
            return timm.create_model(model, img_size=image_size, **kwargs)
        except TypeError:  # a convolutional model: any input size
            return timm.create_model(model, **kwargs)
    except OSError as e:
        raise UserError(f"pretrained weights of timm model '{model}' are not in the Hugging Face cache and could not "
                        f"be downloaded ({str(e).splitlines()[0][:120]}); download them where the hub is "
                        "reachable (HF_HOME names the cache) or use random weights") from None
