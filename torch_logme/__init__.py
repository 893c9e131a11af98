"""torch_logme: LogME transferability scores in PyTorch.

``logme(features, labels)`` scores how well features [N, D] from a
pre-trained model suit a labelled task; ``LogME`` is a drop-in for the
published estimator. ``torch_logme.reference`` holds the numpy reference of
the published algorithms (imported on demand).
"""
from .estimator import LogME
from .functional import logme
from .streaming import LogMEAccumulator

__version__ = "0.1.0"

__all__ = ["LogME", "LogMEAccumulator", "logme", "__version__"]
