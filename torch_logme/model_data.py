"""Labelled data from files, for ``python -m torch_logme rank-models``: image folders and text files.

- A directory is an image folder in torchvision's ``ImageFolder`` layout:
  one subdirectory per class (sorted by name: class ids 0, 1, ...), each
  holding image files (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff,
  .ppm, .pgm; other files are ignored). Images are read with PIL, as RGB.
- A file ``.csv`` has a header row; ``.jsonl`` / ``.ndjson`` hold one JSON
  object per line; ``.json`` holds a list of objects (or JSON lines). Each
  record has a text column and a label column (``text`` and ``label`` by
  default). Labels are class names or ids: integers keep their order, any
  other values are sorted as strings, and they become ids 0, 1, ....

The samples are given raw (PIL images, strings), batched by
:func:`torch_logme.zoo.raw_collate`, so that each zoo model prepares them
its own way (see :mod:`torch_logme.zoo`), or transformed by a given
transform in the DataLoader's workers.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["IMAGE_EXTENSIONS", "LabelledData", "ImageFolderData", "TextData", "read_data", "loader"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEXT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")


class DataFileError(ValueError):
    """A data file or folder that cannot be read as labelled data; the message names it."""


def class_ids(values: Sequence[Any], where: str) -> Tuple[List[int], List[str]]:
    """(ids, class names): integers (or integer strings) in numeric order, anything else sorted as strings."""
    texts = [str(v).strip() for v in values]
    if any(t == "" for t in texts):
        row = next(i for i, t in enumerate(texts) if t == "")
        raise DataFileError(f"{where}: record {row + 1} has an empty label")
    if all(re.fullmatch(r"[+-]?\d+", t) for t in texts):
        names = sorted(set(texts), key=int)
    else:
        names = sorted(set(texts))
    index = {name: i for i, name in enumerate(names)}
    return [index[t] for t in texts], names


class ImageFolderData(Dataset):
    """An image folder (one subdirectory per class): samples (PIL image, class id), or (transform(image), id)."""

    def __init__(self, root: Path, transform: Optional[Callable[[Any], Any]] = None) -> None:
        if not root.is_dir():
            raise DataFileError(f"{root}: not a directory")
        self.root, self.transform = root, transform
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataFileError(f"{root}: no class folders; an image folder holds one subdirectory of images per "
                                "class (torchvision's ImageFolder layout)")
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataFileError(f"{root / name}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples.extend((p, label) for p in files)
        self.labels = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image  # checked by read_data

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")  # reads the pixels, so the file can close
        except OSError as err:
            raise DataFileError(f"{path}: cannot be read as an image ({err})") from err
        return (self.transform(rgb) if self.transform is not None else rgb), label


class TextData(Dataset):
    """Texts with class ids, from a CSV or JSON (lines) file: samples (text, class id)."""

    def __init__(self, texts: List[str], labels: List[int], classes: List[str]) -> None:
        self.texts, self.labels, self.classes = texts, labels, classes

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Tuple[str, int]:
        return self.texts[index], self.labels[index]


def _records(path: Path) -> List[Any]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err})") from err
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: not valid JSON ({err})") from err
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
    return records


def _text_data(path: Path, text_column: str, label_column: str) -> TextData:
    records = _records(path)
    if not records:
        raise DataFileError(f"{path}: no records")
    texts, labels = [], []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataFileError(f"{path}: record {number} is a {type(record).__name__}, not an object with columns")
        missing = [c for c in (text_column, label_column) if c not in record or record[c] is None]
        if missing:
            raise DataFileError(
                f"{path}: record {number} has no {' or '.join(repr(c) for c in missing)} column (its columns: "
                f"{', '.join(map(repr, record))}); name the columns with --text-column and --label-column"
            )
        if not isinstance(record[text_column], str):
            raise DataFileError(f"{path}: record {number}: the text column {text_column!r} holds a "
                                f"{type(record[text_column]).__name__}, not a string")
        texts.append(record[text_column])
        labels.append(record[label_column])
    ids, classes = class_ids(labels, str(path))
    return TextData(texts, ids, classes)


@dataclass
class LabelledData:
    """What :func:`read_data` read: the data set, its kind ("images" or "texts") and its class names."""

    dataset: Dataset
    kind: str
    classes: List[str]
    path: Path

    @property
    def num_samples(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def read_data(path: Any, *, text_column: str = "text", label_column: str = "label",
              transform: Optional[Callable[[Any], Any]] = None, limit: Optional[int] = None,
              seed: int = 0) -> LabelledData:
    """Read an image folder or a text file (see the module's docstring).

    Args:
        path: a directory (images) or a .csv / .jsonl / .ndjson / .json file (texts).
        text_column, label_column: the columns of a text file.
        transform: applied to each image when read (None: PIL images are given as they are).
        limit: keep a random subset of this many samples (drawn with ``seed``); None: all.
        seed: the seed of that subset.

    Raises:
        DataFileError (a ValueError) naming the file for anything unreadable;
        ImportError when an image folder is given and PIL is missing.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            import PIL  # noqa: F401
        except ImportError as err:
            raise ImportError('reading an image folder needs Pillow: pip install "torch_logme[hf]" (or [timm], '
                              '[torchvision], which bring it too)') from err
        dataset: Dataset = ImageFolderData(path, transform)
        kind = "images"
    elif path.suffix.lower() in TEXT_SUFFIXES:
        dataset = _text_data(path, text_column, label_column)
        kind = "texts"
    else:
        raise DataFileError(f"{path}: not an image folder (a directory) nor a text file "
                            f"({', '.join(TEXT_SUFFIXES)})")
    classes = list(dataset.classes)  # type: ignore[attr-defined]
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        # A random subset: the files are sorted by class, so the first N would hold only the first classes.
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
        dataset = Subset(dataset, sorted(order[:limit].tolist()))
    return LabelledData(dataset, kind, classes, path)


def loader(data: LabelledData, batch_size: int, workers: int = 0) -> DataLoader:
    """A DataLoader of (inputs, labels [B]) batches in file order: raw inputs as lists, tensors stacked."""
    from .zoo import raw_collate

    raw = data.kind == "texts" or _gives_raw_images(data.dataset)
    return DataLoader(data.dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=raw_collate if raw else None)


def _gives_raw_images(dataset: Dataset) -> bool:
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    return isinstance(inner, ImageFolderData) and inner.transform is None
