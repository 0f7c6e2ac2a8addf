"""Pure tensor code: teaching signals, losses, the objective, the methods' registry, metrics."""

# Methods registered outside core/methods.py: imported here (not from methods.py, which would close an import
# cycle) so that METHODS is complete whoever imports it.
from distillistic.core import logit_methods  # noqa: F401
