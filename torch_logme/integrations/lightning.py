"""A PyTorch Lightning callback that logs LogME at the end of each validation epoch.

Optional: ``pip install torch_logme[lightning]``. The callback hooks a layer
of the LightningModule while validation runs (:mod:`torch_logme.hooks`),
takes the labels from each validation batch, and logs the score under
``key`` (default ``"val/logme"``), so that::

    ModelCheckpoint(monitor="val/logme", mode="max")

keeps the checkpoint whose features score best. Under DDP every rank scores
its own batches and ``compute()`` sums the statistics across ranks, so each
rank logs the same, global score.

The callback subclasses ``lightning.pytorch.Callback``, or
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

from ..hooks import LayerScorer, check_options


def second_item(batch: Any) -> Any:
    """The labels of an ``(inputs, labels, ...)`` batch."""
    return batch[1]


class LogMECallback(pl.Callback):
    """Log the LogME score of ``layer`` over each validation epoch.

    Args:
        layer: a dotted name from ``pl_module.named_modules()`` (or the module).
        key: the logged name (default ``"val/logme"``).
        labels: batch -> labels [B]; default ``batch[1]``.
        dataloader_idx: the validation dataloader to score (others pass unscored).
        prog_bar: show the score in the progress bar.
        on, transform, **options: as for :func:`torch_logme.hooks.score_layers`
            (e.g. ``on="input"``, ``num_classes=10``).

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
        super().__init__()
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be one module or dotted name, got {type(layer).__name__}")
        if not callable(labels):
            raise TypeError(f"labels must be callable (batch -> labels), got {type(labels).__name__}")
        self.layer = layer
        self.key = key
        self.get_labels = labels
        self.dataloader_idx = dataloader_idx
        self.prog_bar = prog_bar
        self._scorer_kwargs: Dict[str, Any] = dict(on=on, transform=transform, **options)
        check_options(on, transform, options)
        self.history: List[Tuple[int, float]] = []
        self._scorer: Optional[LayerScorer] = None

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
            warnings.warn(f"LogMECallback: layer {self.layer!r} saw no validation batch; nothing logged")
            return
        (value,) = scorer.compute().values()  # sums across ranks when distributed
        score = float(value)
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
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.history = [(int(e), float(s)) for e, s in state_dict.get("history", [])]
