"""Pure tensor code: teaching signals, losses, the objective, the methods' registry, metrics."""

# Methods registered in modules of their own: importing any part of core registers them into METHODS.
from distillistic.core import feature_methods as _feature_methods  # noqa: F401
