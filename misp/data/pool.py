"""The candidate image pool for negative retrieval: a JSON Lines listing or a folder of images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from misp.data.records import RecordError, read_utf8
from misp.images import verify_image
from misp.utils.io import sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_pool(source: str | Path, image_root: str | Path | None = None, verify: bool = True) -> list[Path]:
    """Image paths of the pool, in a stable order.

    ``source`` is either a JSON Lines file whose rows have an ``image`` field (the Shapes world's
    ``pool.jsonl``) or a folder searched recursively for images (COCO ``train2017/``), sorted by path.
    With ``verify`` every image is opened once up front, so a bad file fails now and not mid-run.
    """
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
        for n, line in enumerate(read_utf8(source).splitlines(), start=1):
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
    paths = []
    first: dict[str, int] = {}  # content hash -> line of its first entry
    duplicates = []
    for image, n in lines:
        path = Path(image) if root is None or Path(image).is_absolute() else root / image
        if verify:
            if reason := verify_image(path):
                raise RecordError(source, n, "image", reason)
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
