"""distillistic: knowledge distillation for image classification, judged by accuracy and calibration.

Python API (mirrors ``distillistic train``)::

    from distillistic import Config, train
    result = train(Config(algo="kd", dataset="digits", model="cnn", teacher="cnn_wide", out="runs/kd"))
    result.summary["models"]["student"]["test"]["top1"]
"""

from distillistic.config import Config
from distillistic.errors import UserError
from distillistic.training.run import RunResult, train

__all__ = ["Config", "RunResult", "UserError", "train"]
