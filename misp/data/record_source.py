"""Where records come from: a JSON Lines / JSON array file, or a Hugging Face dataset.

``open_rows(source)`` tells the two apart and yields ``(number, row)`` pairs either way:

- a file whose suffix is not ``.parquet`` or ``.arrow`` is a record file (JSON Lines, or one JSON array;
  told apart by the first non-blank character, not the suffix, because the official POPE files are JSON
  Lines named ``.json``); ``number`` is the 1-based line (or array item);
- a ``.parquet`` or ``.arrow`` file, a folder (written by ``Dataset.save_to_disk``, or holding data files
  that ``datasets.load_dataset`` recognises) or a hub id (``owner/name``, with ``split`` and ``revision``) is
  a dataset, read through ``datasets``: memory-mapped Arrow (or, with ``streaming``, row groups read as
  they are needed), so 100k-row sets are never held in memory; ``number`` is the 0-based row, as
  ``dataset[row]`` indexes it. Image columns are read undecoded (``{"bytes", "path"}``): the reader stores
  embedded bytes once each by content (``misp.data.image_store``) and decodes nothing twice.

JSON Lines are split on ``"\\n"`` only (``"\\r\\n"`` endings are accepted): valid JSON Lines may hold a raw
U+2028, U+0085 or form feed inside a string, which ``str.splitlines`` would wrongly break.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misp.errors import UserError

DATASET_SUFFIXES = (".parquet", ".arrow")


class DatasetSourceError(UserError, ValueError):
    """A dataset that cannot be opened: not found, an unknown split, an unreadable file."""


def jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line)`` of JSON Lines text, split on ``"\\n"`` only (a trailing ``"\\r"`` dropped)."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line[:-1] if line.endswith("\r") else line


def is_dataset_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` is read through ``datasets`` (parquet/arrow file, folder or hub id), not as JSON."""
    p = Path(source).expanduser()
    if p.suffix.lower() in DATASET_SUFFIXES or p.is_dir():
        return True
    if p.exists():
        return False
    # Not on disk: a hub id is "owner/name" (two parts, no suffix a record file would have).
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and p.suffix.lower() not in (".json", ".jsonl")


@dataclass
class DatasetRows:
    """An opened dataset: its rows, its size and how errors name it."""

    name: str
    """The dataset as the user gave it (a path or a hub id)."""
    split: str
    """The split read."""
    dataset: Any
    """The ``datasets.Dataset`` (or ``IterableDataset`` when streaming)."""
    base: Path
    """The folder relative image paths in its rows start from (the file's folder; the cwd for a hub id)."""

    def __len__(self) -> int:
        n = getattr(self.dataset, "num_rows", None)
        if n is None:
            raise TypeError("a streamed dataset has no length until it is read")
        return n

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names or [])

    def rows(self, batch_size: int = 1024) -> Iterator[tuple[int, dict]]:
        """``(row, values)`` in order; read a batch at a time (formatting row by row costs twice as much)."""
        number = 0
        for batch in self.dataset.iter(batch_size=batch_size):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield number, dict(zip(columns, values, strict=True))
                number += 1


def _undecoded(features: Any) -> Any:
    """``features`` with every ``Image`` (at any depth) set to ``decode=False``."""
    from datasets import Image

    if isinstance(features, Image):
        return Image(decode=False)
    if isinstance(features, dict):
        return type(features)({k: _undecoded(v) for k, v in features.items()})
    if isinstance(features, (list, tuple)):
        return type(features)(_undecoded(v) for v in features)
    inner = getattr(features, "feature", None)
    if inner is not None and hasattr(features, "__dataclass_fields__"):
        from dataclasses import replace

        return replace(features, feature=_undecoded(inner))
    return features


def open_dataset(
    source: str | os.PathLike, split: str = "train", revision: str | None = None, streaming: bool = False
) -> DatasetRows:
    """Open a parquet/arrow file, a dataset folder or a hub dataset for reading row by row.

    Args:
        source: a ``.parquet`` or ``.arrow`` file, a folder (``save_to_disk`` output or data files), or a
            hub id.
        split: the split to read (a single data file holds one split, ``train``).
        revision: the hub revision (branch, tag or commit); ignored for local files.
        streaming: read row groups as they are needed instead of memory-mapping a prepared Arrow copy.

    Raises:
        DatasetSourceError: one line naming the dataset and what is wrong.
    """
    import datasets

    text = str(source)
    p = Path(source).expanduser()
    name = text
    try:
        if p.is_file():
            kind = "parquet" if p.suffix.lower() == ".parquet" else "arrow"
            ds = datasets.load_dataset(kind, data_files={"train": str(p)}, split=split, streaming=streaming)
            base = p.parent
        elif p.is_dir():
            if (p / "dataset_info.json").exists() and (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
            elif (p / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(p))[split]
            else:
                ds = datasets.load_dataset(str(p), split=split, streaming=streaming)
            base = p
        elif p.suffix.lower() in DATASET_SUFFIXES:
            raise DatasetSourceError(f"{name}: file not found")
        else:
            ds = datasets.load_dataset(text, split=split, revision=revision, streaming=streaming)
            base = Path.cwd()
    except DatasetSourceError:
        raise
    except KeyError:
        raise DatasetSourceError(f"{name}: no split {split!r}") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetSourceError(f"{name} (split {split!r}): cannot open the dataset: {message}") from None
    features = getattr(ds, "features", None)
    if features:
        for column, feature in features.items():
            plain = _undecoded(feature)
            if plain != feature:
                ds = ds.cast_column(column, plain)
    return DatasetRows(name=name, split=split, dataset=ds, base=base.absolute())
