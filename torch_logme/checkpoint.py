"""Checkpoint selection by a transferability score: after each epoch, score a layer, keep the best.

``CheckpointSelector(model, layer, loader, directory, score="logme")`` runs
the model over the target task's loader with a forward hook on ``layer``
(:mod:`torch_logme.hooks`), and when the score beats every earlier epoch
(in the score's direction, ``SCORES[score].larger_is_better``) it writes
``model.state_dict()`` to ``directory/best.pt``. The file is replaced
atomically (temporary file in the same directory, fsync, ``os.replace``), so
a crash mid-write leaves the previous best intact; it gets the permissions
``torch.save`` would give it (the umask's, or those of the file it replaces).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import registry
from ._pool import TermPool
from .hooks import Layer, LayerScorer
from .registry import DEFAULT_SCORE

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_beside(path: Path) -> Tuple[int, Path]:
    """Create a new, empty temporary file in ``path``'s directory; return its descriptor and path.

    Unlike ``tempfile.mkstemp`` (always mode 0600), the file is created with
    mode 0666 less the umask, as ``open(path, "wb")`` inside ``torch.save``
    would create it, so the checkpoint is as readable as a torch.save'd one.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # O_EXCL: never reuse a name, not even a symlink's
            continue
    raise FileExistsError(f"no free temporary file name beside {path}")


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` holds either the old or the new file, never a torn one.

    The new file gets the permissions ``torch.save`` would give it: those of
    the file it replaces, or 0666 less the umask for a new one.
    """
    path = Path(path)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                # torch.save over an existing file keeps that file's mode: so does the rename.
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                pass
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _check_filename(filename: Any) -> str:
    """``filename`` if it is a plain file name; ValueError (TypeError for a non-path) otherwise.

    Checked when the selector is made, not at the first save after an epoch
    of scoring, and so that the checkpoint can only go into ``directory``.
    """
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"filename must be a file name (str), got {type(filename).__name__}")
    name = os.fspath(filename)
    if not isinstance(name, str):
        raise TypeError(f"filename must be a file name (str), got {type(name).__name__}")
    separators = [sep for sep in ("/", os.sep, os.altsep) if sep]
    if name in ("", ".", "..") or any(sep in name for sep in separators) or Path(name).name != name:
        raise ValueError(
            f"filename must be a plain file name such as 'best.pt', written inside directory, got {name!r}"
        )
    return name


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(x, device) for x in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class CheckpointSelector:
    """Score ``layer`` of ``model`` on ``loader`` after each epoch; keep the best state_dict.

    Args:
        model: the network being trained.
        layer: the module (or dotted name) whose features are scored.
        loader: iterable of ``(inputs, labels)`` batches of the target task;
            ``model(inputs)`` is called for each, in eval mode, under no_grad.
        directory: where the best checkpoint goes (created if missing).
        score: the name of a streaming score of :data:`torch_logme.SCORES`
            (default ``"logme"``); the best epoch is its largest value, or
            its smallest for a score whose ``larger_is_better`` is False.
        filename: name of the checkpoint file in ``directory`` (default
            ``best.pt``): a plain name, without a folder; anything else is a
            ValueError here.
        device: where to move ``inputs``; default: the device of the model's
            first parameter. The labels are moved to the features' device.
        on: as for :func:`torch_logme.hooks.score_layers` (e.g. ``on="input"``).
        transform: as for :func:`torch_logme.hooks.score_layers`.
        **options: as for :func:`torch_logme.hooks.score_layers` (e.g.
            ``num_classes=10``, ``score_options=``).

    After :meth:`step`, ``history`` is the list of (epoch, score), and
    ``best_epoch`` / ``best_score`` name the epoch in ``path``. A tie keeps
    the earlier epoch; an epoch that scores NaN is never the best.
    ``score_name`` and ``spec`` (its :class:`~torch_logme.ScoreSpec`) name
    the score. A NaN ``best_score`` (only a hand-made or corrupt state holds
    one) counts as no best yet: the next epoch that scores a number is saved.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Layer,
        loader: Iterable,
        directory: PathLike,
        *,
        score: str = DEFAULT_SCORE,
        filename: str = "best.pt",
        device: Union[str, torch.device, None] = None,
        on: str = "output",
        transform: Optional[Callable[[Any], Tensor]] = None,
        **options: Any,
    ) -> None:
        filename = _check_filename(filename)
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be one module or dotted name, got {type(layer).__name__}")
        if not isinstance(score, str) or "scores" in options:
            raise TypeError("CheckpointSelector selects on one score: give its name as score= (a str)")
        # Resolve the layer and check the score and options now rather than after the first epoch.
        LayerScorer(model, layer, scores=score, on=on, transform=transform, **options).remove()
        self.model = model
        self.layer = layer
        self.loader = loader
        self.score_name = score
        self.spec = registry.get_score(score)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / filename
        self.device = torch.device(device) if device is not None else None
        self._scorer_kwargs: Dict[str, Any] = dict(scores=score, on=on, transform=transform, **options)
        self.history: List[Tuple[int, float]] = []
        self.best_epoch: Optional[int] = None
        self.best_score: Optional[float] = None
        # A score normalised across a pool (spec.terms): every epoch's terms, the pool it is combined over.
        self._pool = TermPool(self.spec)

    def _measure(self) -> Tensor:
        """The score (0-dim) or, for a pooled score, its terms [T], for the model as it is now."""
        device = self.device or _model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with LayerScorer(self.model, self.layer, **self._scorer_kwargs) as scorer, torch.no_grad():
                for inputs, labels in self.loader:
                    scorer.labels(labels)
                    self.model(_to_device(inputs, device))
            (value,) = scorer.compute().values()
        finally:
            self.model.train(was_training)
        return value

    def score(self) -> float:
        """The score of the layer's features over the loader, for the model as it is now.

        For a score normalised across a pool of models (``SCORES[name].terms``),
        the pool is this epoch and every earlier one: its value combined with
        theirs, as ``rank_models`` combines models.
        """
        value = self._measure()
        return self._pool.combined(value)[-1] if self.spec.pooled else float(value)

    @property
    def terms(self) -> List[List[float]]:
        """For a pooled score: every scored epoch's terms (empty otherwise)."""
        return self._pool.terms

    def step(self, epoch: Optional[int] = None) -> float:
        """Score the model for ``epoch`` (default: the next number), save it if it is the best so far.

        With a score normalised across a pool, the epoch is compared with the
        saved one, both combined with the pool as it is now (this epoch and
        the earlier ones), and ``best_score`` is the saved epoch's value in
        that pool.
        """
        if epoch is None:
            epoch = self.history[-1][0] + 1 if self.history else 0
        measured = self._measure()
        best = self.best_score
        if self.spec.pooled:
            pool = self._pool.add(measured)
            value = pool[-1]
            # The epoch on disk, in the pool as it is now (the pool's rows follow the history's).
            saved = [i for i, (e, _) in enumerate(self.history) if e == self.best_epoch and i < len(pool) - 1]
            best = pool[saved[-1]] if saved else None
            self.best_score = best
        else:
            value = float(measured)
        self.history.append((epoch, value))
        # A NaN best is no best: nothing beats NaN, so keeping it would never save again.
        if not math.isnan(value) and (best is None or math.isnan(best) or self._better(value, best)):
            atomic_save(self.model.state_dict(), self.path)
            self.best_epoch, self.best_score = epoch, value
        return value

    def _better(self, value: float, best: float) -> bool:
        """Whether ``value`` beats ``best`` strictly (a tie keeps the earlier epoch)."""
        return value > best if self.spec.larger_is_better else value < best

    def state_dict(self) -> Dict[str, Any]:
        """History and best so far, and the score's name, to resume selection after a restart."""
        return {"history": list(self.history), "best_epoch": self.best_epoch, "best_score": self.best_score,
                "score": self.score_name, "terms": [list(t) for t in self.terms]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a state without a score's name is taken as this score's).

        A NaN best score is loaded as no best (``best_epoch`` and
        ``best_score`` None): the next epoch that scores a number replaces
        the checkpoint, instead of none ever beating NaN.
        """
        saved = state.get("score", self.score_name)
        if saved != self.score_name:
            raise ValueError(
                f"the state was saved while selecting on {saved!r}, this selector selects on {self.score_name!r}: "
                "its best score is not comparable"
            )
        # Everything parsed before anything is set: a malformed state changes nothing.
        history = [(int(e), float(s)) for e, s in state["history"]]
        terms = [[float(v) for v in t] for t in state.get("terms", [])]
        if self.spec.pooled and any(len(t) != len(self.spec.terms) for t in terms):
            raise ValueError(f"the state's terms are not {len(self.spec.terms)} per epoch ({self.spec.terms})")
        best_epoch, best_score = state["best_epoch"], state["best_score"]
        if best_score is not None and math.isnan(float(best_score)):
            best_epoch, best_score = None, None
        self.history, self._pool.terms = history, terms
        self.best_epoch, self.best_score = best_epoch, best_score
