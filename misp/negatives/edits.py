"""The ``edits`` source: K of a record's edited images, each with its own correct response (response pairs).

SymMPO and IC-VCO pair each edited image ``m_k`` with the response that is true of it, ``y_k``, so that the
objective compares two responses under one image (method.md 9). A record carries its edits in one of two
places, read in this order:

1. ``edits``: the record layout field ``[{"image", "response"}, ...]`` (docs/data.md), for any data set;
2. ``meta["captioned_counterfactuals"]``: the Shapes world's format 6 (docs/world.md), each counterfactual
   with its ``caption``, image paths relative to ``image_root`` or the records file's folder.

Each draw is a ``NegativeRef("edits", path=<image>, index=<position in the record's list>, response=<y_k>)``,
drawn uniformly with replacement (log q = -log n), a pure function of (seed, epoch, record id). The data path
then adds the rows ``(m_k, y_k)`` and ``(m_p, y_k)`` to the batch (``misp.data.pairs``) and the token spans
each edit changes (``misp.data.pairs.edit_spans``).
"""

from __future__ import annotations

from pathlib import Path

from misp.batch import NegativeRef

SOURCE = "edits"
"""The source's name (``method.negatives.source: edits``)."""
FIELD = "edits"
"""The record layout field that carries edited images with their responses."""
WORLD_KEY = "captioned_counterfactuals"
"""The Shapes world's ``meta`` key for the same (format 6)."""


def _world_edits(record) -> list[dict]:
    """Format 6's captioned counterfactuals of ``record`` that have an image and a non-empty caption."""
    return [item for item in record.meta.get(WORLD_KEY, []) or []
            if isinstance(item, dict) and item.get("image") and isinstance(item.get("caption"), str)
            and item["caption"].strip()]


def record_edits(record, records_file: str, image_root: str | None) -> list[tuple[str, str]]:
    """``(image path, own response)`` of each edit ``record`` carries, in its order (empty when it carries none)."""
    if getattr(record, "edits", ()):
        return [(str(e.image), e.response) for e in record.edits]
    root = Path(image_root) if image_root else Path(records_file).parent
    return [(str(root / item["image"]), item["caption"]) for item in _world_edits(record)]


def record_targets(record, records_file: str, image_root: str | None) -> list[str]:
    """The image paths of the record's target edits: ``edits`` items with ``target: true``, or format 6's
    captioned counterfactuals that insert or remove the trigger's partner (``partner: true``)."""
    if getattr(record, "edits", ()):
        return [str(e.image) for e in record.edits if e.target]
    root = Path(image_root) if image_root else Path(records_file).parent
    return [str(root / item["image"]) for item in _world_edits(record) if item.get("partner") is True]


def edit_refs(record, records_file: str, image_root: str | None) -> list[NegativeRef]:
    """The record's edits as refs of the ``edits`` source (file, position, own response)."""
    return [NegativeRef(SOURCE, path, j, response=response)
            for j, (path, response) in enumerate(record_edits(record, records_file, image_root))]


def missing_edits_reason() -> str:
    """What a record without edits lacks, for its one-line error."""
    return (f"no edited images with their own responses: source {SOURCE!r} needs a non-empty '{FIELD}' list "
            f"([{{\"image\", \"response\"}}, ...]) or meta.{WORLD_KEY} (a Shapes world written with object_edits)")
