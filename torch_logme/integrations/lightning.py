"""PyTorch Lightning callbacks that log a transferability score at the end of each validation epoch.

Optional: ``pip install torch_logme[lightning]``. ``ScoreCallback(layer,
score=name)`` hooks a layer of the LightningModule while validation runs
(:mod:`torch_logme.hooks`), takes the labels from each validation batch,
and logs the score (any streaming score of :data:`torch_logme.SCORES`)
under ``key`` (default ``f"val/{score}"``), so that::

    callback = ScoreCallback("backbone", score="h_score", num_classes=10)
    ModelCheckpoint(monitor=callback.key, mode=callback.mode)

keeps the checkpoint whose features score best (``mode`` is the score's
direction, ``SCORES[score].mode``). ``LogMECallback`` is the LogME case,
logging ``"val/logme"``. Under DDP every rank scores its own batches and
``compute()`` sums the statistics across ranks, so each rank logs the same,
global score.

The callbacks subclass ``lightning.pytorch.Callback``, or
``pytorch_lightning.Callback`` when only that package is installed.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "torch_logme.integrations.lightning needs Lightning: pip install 'torch_logme[lightning]'"
        ) from err

from .. import registry
from .._pool import TermPool
from ..hooks import LayerScorer, check_options
from ..registry import DEFAULT_SCORE


def second_item(batch: Any) -> Any:
    """The labels of an ``(inputs, labels, ...)`` batch."""
    return batch[1]


class ScoreCallback(pl.Callback):
    """Log a streaming score of ``layer`` over each validation epoch.

    Args:
        layer: a dotted name from ``pl_module.named_modules()`` (or the module).
        score: the name of a streaming score of :data:`torch_logme.SCORES`
            (default ``"logme"``).
        key: the logged name (default ``f"val/{score}"``).
        labels: batch -> labels [B]; default ``batch[1]``.
        dataloader_idx: the validation dataloader to score (others pass unscored).
        prog_bar: show the score in the progress bar.
        on: as for :func:`torch_logme.hooks.score_layers` (e.g. ``on="input"``).
        transform: as for :func:`torch_logme.hooks.score_layers`.
        **options: as for :func:`torch_logme.hooks.score_layers` (e.g.
            ``num_classes=10``, ``score_options=``).

    ``score_name`` is the score; ``mode`` is ``"max"`` or ``"min"``, its
    direction, for ``ModelCheckpoint(monitor=callback.key, mode=callback.mode)``.
    A score normalised across a pool (``SCORES[score].pooled``: NCTI, ETran)
    is logged combined with the epochs so far (0 for the first), so its
    values move as the pool grows and ``ModelCheckpoint`` cannot compare
    them across epochs: select on such a score with
    :class:`torch_logme.CheckpointSelector`, which compares with the pool as
    it stands; the terms are logged too, as ``f"{key}/{term}"``.
    ``history`` holds (epoch, score) for every scored epoch. The sanity-check
    validation before training is not scored.
    """

    def __init__(
        self,
        layer: Union[str, nn.Module],
        *,
        score: str = DEFAULT_SCORE,
        key: Optional[str] = None,
        labels: Callable[[Any], Any] = second_item,
        dataloader_idx: int = 0,
        prog_bar: bool = False,
        on: str = "output",
        transform: Optional[Callable[[Any], Tensor]] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be one module or dotted name, got {type(layer).__name__}")
        if not isinstance(score, str) or "scores" in options:
            raise TypeError(f"{type(self).__name__} logs one score: give its name as score= (a str)")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str (the logged name), got {type(key).__name__}")
        if not callable(labels):
            raise TypeError(f"labels must be callable (batch -> labels), got {type(labels).__name__}")
        score_options = options.pop("score_options", None)
        check_options(on, transform, options, scores=score, score_options=score_options)
        self.score_name = score
        self.mode = registry.get_score(score).mode
        self.layer = layer
        self.key = f"val/{score}" if key is None else key
        self.get_labels = labels
        self.dataloader_idx = dataloader_idx
        self.prog_bar = prog_bar
        self._scorer_kwargs: Dict[str, Any] = dict(
            scores=score, on=on, transform=transform, score_options=score_options, **options
        )
        self.history: List[Tuple[int, float]] = []
        self._scorer: Optional[LayerScorer] = None
        # A score normalised across a pool (spec.terms) is combined across the epochs so far.
        self._pool = TermPool(registry.get_score(score))

    @property
    def state_key(self) -> str:
        # Unique per logged key, so that several of these callbacks (one per score) each keep their history.
        return self._generate_state_key(key=self.key)

    # -- hooks ------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close()
        if trainer.sanity_checking:
            return
        self._scorer = LayerScorer(pl_module, self.layer, **self._scorer_kwargs)

    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        scorer = self._scorer
        if scorer is None:
            return
        scorer.enabled = dataloader_idx == self.dataloader_idx
        if scorer.enabled:
            scorer.labels(self.get_labels(batch))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        scorer = self._scorer
        if scorer is None:
            return
        scorer.remove()
        self._scorer = None
        if any(acc is None for acc in scorer.accumulators.values()):
            # Lightning calls this hook: no caller of the user's to point at.
            warnings.warn(
                f"{type(self).__name__}: layer {self.layer!r} saw no validation batch; nothing logged", stacklevel=1
            )
            return
        (value,) = scorer.compute().values()  # sums across ranks when distributed
        score = self._pool.add(value)[-1] if self._pool.spec.pooled else float(value)
        if self._pool.spec.pooled:  # the raw terms do not move with the pool
            for term, v in zip(self._pool.spec.terms, self._pool.terms[-1]):
                pl_module.log(f"{self.key}/{term}", v, prog_bar=False, sync_dist=False)
        self.history.append((trainer.current_epoch, score))
        # Already the same on every rank: no sync_dist needed.
        pl_module.log(self.key, score, prog_bar=self.prog_bar, sync_dist=False)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._scorer is not None:
            self._scorer.remove()
            self._scorer = None

    # -- checkpointed state --------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"history": list(self.history), "terms": [list(t) for t in self._pool.terms]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        history = [(int(e), float(s)) for e, s in state_dict.get("history", [])]  # parsed first: all or nothing
        terms = [[float(v) for v in t] for t in state_dict.get("terms", [])]
        self.history, self._pool.terms = history, terms


class LogMECallback(ScoreCallback):
    """Log the LogME score of ``layer`` over each validation epoch: ``ScoreCallback(layer, score="logme")``.

    Args:
        layer: a dotted name from ``pl_module.named_modules()`` (or the module).
        key: the logged name (default ``"val/logme"``).
        labels: batch -> labels [B]; default ``batch[1]``.
        dataloader_idx: the validation dataloader to score (others pass unscored).
        prog_bar: show the score in the progress bar.
        on: as for :func:`torch_logme.hooks.score_layers` (e.g. ``on="input"``).
        transform: as for :func:`torch_logme.hooks.score_layers`.
        **options: as for :func:`torch_logme.hooks.score_layers` (e.g.
            ``num_classes=10``).

    ``history`` holds (epoch, score) for every scored epoch. The sanity-check
    validation before training is not scored.
    """

    def __init__(
        self,
        layer: Union[str, nn.Module],
        *,
        key: str = "val/logme",
        labels: Callable[[Any], Any] = second_item,
        dataloader_idx: int = 0,
        prog_bar: bool = False,
        on: str = "output",
        transform: Optional[Callable[[Any], Tensor]] = None,
        **options: Any,
    ) -> None:
        if "score" in options:
            raise TypeError("LogMECallback logs LogME; for another score use ScoreCallback(layer, score=name)")
        super().__init__(layer, score="logme", key=key, labels=labels, dataloader_idx=dataloader_idx,
                         prog_bar=prog_bar, on=on, transform=transform, **options)

    @property
    def state_key(self) -> str:
        # The key its history was always saved under, so that older checkpoints resume it.
        return type(self).__qualname__
