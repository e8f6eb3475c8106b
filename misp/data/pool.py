"""The candidate image pool for negative retrieval: a JSON Lines listing or a folder of images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from misp.data.image_store import ImageStore, image_bytes
from misp.data.record_source import DATASET_SUFFIXES, is_dataset_source, jsonl_lines, open_dataset
from misp.data.records import RecordError, read_utf8
from misp.images import verify_image
from misp.utils.io import sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _dataset_images(
    source: str | Path, column: str, split: str, image_store: str | Path | None
) -> list[tuple[str, int]]:
    """(image path, row) for every image in ``column`` of a dataset (embedded images stored by content)."""
    dataset = open_dataset(source, split)
    if column not in dataset.columns:
        raise RecordError(source, None, column, f"missing column (the dataset has {dataset.columns})", split=split)
    store = ImageStore(image_store if image_store is not None else Path.home() / ".cache" / "misp" / "images")
    out = []
    for row_number, row in dataset.rows():
        values = row[column] if isinstance(row[column], list) else [row[column]]
        for value in values:
            data = image_bytes(value)
            if data is not None:
                out.append((str(store.put(data)), row_number))
                continue
            path = value.get("path") if isinstance(value, dict) else value
            if not isinstance(path, str) or not path.strip():
                raise RecordError(source, row_number, column, "neither an embedded image nor a path", split=split)
            out.append((str(Path(path) if Path(path).is_absolute() else dataset.base / path), row_number))
    if not out:
        raise RecordError(source, None, column, "no images", split=split)
    return out


def read_pool(
    source: str | Path,
    image_root: str | Path | None = None,
    verify: bool = True,
    column: str = "image",
    split: str = "train",
    image_store: str | Path | None = None,
) -> list[Path]:
    """Image paths of the pool, in a stable order.

    ``source`` is a JSON Lines file whose rows have an ``image`` field (the Shapes world's
    ``pool.jsonl``), a folder searched recursively for images (COCO ``train2017/``), sorted by path, or a
    dataset (a ``.parquet``/``.arrow`` file or a hub id) whose ``column`` holds an image (or a list of
    them) per row, embedded or as paths; embedded images are written once each, named by content, to
    ``image_store``. With ``verify`` every image is opened once up front, so a bad file fails now and
    not mid-run.
    """
    if Path(source).suffix.lower() in DATASET_SUFFIXES or (not Path(source).exists() and is_dataset_source(source)):
        return _checked(Path(source), _dataset_images(source, column, split, image_store), None, verify, split)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image pool {source} does not exist")
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"image pool {source}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        lines = [(str(p), i + 1) for i, p in enumerate(paths)]
        root = None
    else:
        root = Path(image_root) if image_root else source.parent
        lines = []
        for n, line in jsonl_lines(read_utf8(source)):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(source, n, None, f"invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise RecordError(source, n, "image", "missing or not a string")
            lines.append((row["image"], n))
        if not lines:
            raise RecordError(source, 1, None, "file has no records")
    return _checked(source, lines, root, verify, None)


def _checked(source: Path, lines: list[tuple[str, int]], root: Path | None, verify: bool, split: str | None) -> list[Path]:
    paths = []
    first: dict[str, int] = {}  # content hash -> line of its first entry
    duplicates = []
    for image, n in lines:
        path = Path(image) if root is None or Path(image).is_absolute() else root / image
        if verify:
            if reason := verify_image(path):
                raise RecordError(source, n, "image", reason, split=split)
            # The file was just read to decode it, so hashing it costs little next to that.
            digest = sha256_file(path)
            if digest in first:
                duplicates.append((n, first[digest]))
            first.setdefault(digest, n)
        paths.append(path)
    if duplicates:
        # Kept (indices into the pool must stay stable), but a record can then get the same image twice.
        n, m = duplicates[0]
        log.warning(
            "image pool %s: %d of %d entries repeat an earlier image's content (first: line %d = line %d): "
            "a record's candidates can hold the same image twice", source, len(duplicates), len(paths), n, m,
        )
    return paths
