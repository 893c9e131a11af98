"""torch_logme: LogME transferability scores in PyTorch.

``logme(features, labels)`` scores how well features [N, D] from a
pre-trained model suit a labelled task; ``LogME`` is a drop-in for the
published estimator. ``SCORES`` holds every score by name and
``accumulator(name, ...)`` streams any of them. ``evaluate_scores`` checks
scores against fine-tuning results (``weighted_tau`` and other rank
correlations). ``torch_logme.reference`` holds the numpy reference of
the published algorithms (imported on demand). ``torch_logme.zoo`` builds
timm, Hugging Face and torchvision models by name for ``rank_models``.
"""
from . import zoo  # noqa: F401  registers the "timm:", "hf:" and "torchvision:" adapters
from ._checks import relabel
from ._extension import extension_available
from ._version import __version__
from .estimator import LogME
from .etran import etran, etran_combine
from .evaluation import Evaluation, evaluate_scores, weighted_tau
from .functional import logme
from .knn import knn
from .model_ranking import ModelRanking
from .ncti import ncti, ncti_combine
from .nleep import nleep
from .parc import parc
from .ranking import Ranking, rank_models
from .registry import SCORES, ScoreSpec, accumulator
from .scores import gbc, h_score, leep, nce, regularized_h_score, transrate
from .sfda import sfda
from .streaming import LogMEAccumulator
from .streaming_scores import (
    GBCAccumulator,
    HScoreAccumulator,
    NCEAccumulator,
    RegularizedHScoreAccumulator,
    TransRateAccumulator,
)

__all__ = [
    "LogME", "LogMEAccumulator", "extension_available", "logme", "__version__",
    # other transferability scores, their accumulators, and model ranking
    "leep", "nce", "h_score", "regularized_h_score", "transrate", "gbc", "sfda", "ncti", "ncti_combine",
    "nleep", "etran", "etran_combine", "knn", "parc",
    "NCEAccumulator", "HScoreAccumulator", "RegularizedHScoreAccumulator",
    "TransRateAccumulator", "GBCAccumulator",
    "rank_models", "Ranking", "ModelRanking", "relabel",
    # checking scores against fine-tuning results
    "weighted_tau", "evaluate_scores", "Evaluation",
    # every score by name
    "SCORES", "ScoreSpec", "accumulator",
]
