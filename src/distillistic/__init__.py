"""distillistic: knowledge distillation for image classification, judged by accuracy and calibration.

Python API (mirrors ``distillistic train``)::

    from distillistic import Config, train
    result = train(Config(algo="kd", dataset="digits", model="cnn", teacher="cnn_wide", out="runs/kd"))
    result.summary["models"]["student"]["test"]["top1"]

A finished run's student, with its preprocessing, as a module taking uint8 images::

    from distillistic import load_student
    model = load_student("runs/kd")              # or an exported .safetensors file
    model.class_names[model(images).argmax(1)[0]]

``train``, ``RunResult``, ``register_model``, ``register_dataset``, ``register_method`` and ``load_student`` are
imported on first use, so
that ``distillistic --help`` does not pay for importing torch.
"""

from typing import TYPE_CHECKING, Any

from distillistic.config import Config
from distillistic.errors import UserError

if TYPE_CHECKING:
    from distillistic.deploy.students import load_student
    from distillistic.methods.registry import register_method
    from distillistic.training.plugins import register_dataset, register_model
    from distillistic.training.run import RunResult, train

__all__ = ["Config", "RunResult", "UserError", "load_student", "register_dataset", "register_method", "register_model",
           "train"]
_LAZY = {"train": "distillistic.training.run", "RunResult": "distillistic.training.run",
         "register_model": "distillistic.training.plugins", "register_dataset": "distillistic.training.plugins",
         "load_student": "distillistic.deploy.students", "register_method": "distillistic.methods.registry"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distillistic' has no attribute {name!r}")
