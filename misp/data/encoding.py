"""Tokenising a record file's texts, with errors that name the file, the line and the record.

``encode_example`` checks what only tokenisation can: one ``<image>`` in the prompt and none in a
response, and a prompt that fits ``max_length``. It knows nothing of files, so the datamodules encode
through :func:`encode_records`, which turns its ``ValueError`` into a ``RecordError``
(``FILE:LINE: field 'prompt': record 'ID': REASON``) and, with ``on_bad_record="skip"``, drops the
record and counts it in one warning, as the readers do for every other bad record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from misp.data.records import OnBadRecord, ReadResult, RecordError

log = logging.getLogger(__name__)


def _blamed_field(message: str, response_field: str) -> str | None:
    # encode_example's messages start with what they are about.
    if message.startswith("the prompt"):
        return "prompt"
    if message.startswith("the response"):
        return response_field
    return None


def encode_records(
    read: ReadResult,
    responses: Sequence[str],
    encode: Callable[[str, str], dict[str, list[int]]],
    on_bad_record: OnBadRecord = "raise",
    image_tokens: Sequence[int] | None = None,
) -> tuple[list[int], list[tuple[dict[str, list[int]], ...]]]:
    """Encode ``(record.prompt, record.<field>)`` for each field of ``responses`` and every record.

    Args:
        read: the records as a reader returned them (their file and lines name them in errors).
        responses: the record attributes to encode after the prompt, e.g. ``("chosen", "rejected")``.
        encode: ``(prompt, response) -> {"input_ids", "labels"}``, usually ``encode_example`` bound to the
            processor and ``max_length``; called with ``history=`` too for a record that holds a conversation.
        on_bad_record: ``raise`` the first error, or ``skip`` the record and warn once with the count.
        image_tokens: each record's image token count, for a dynamic-resolution model
            (``misp.models.prompting.record_image_tokens``); passed to ``encode`` as ``image_tokens=`` so that
            its ``max_length`` counts the image as the model will see it. None passes nothing.

    Returns:
        (kept, encoded): the positions in ``read.records`` of the records encoded, and for each the
        encodings in the order of ``responses``.

    Raises:
        RecordError: a record's text cannot be encoded (``raise`` mode), or no record can (``skip``).
    """
    kept: list[int] = []
    encoded: list[tuple[dict[str, list[int]], ...]] = []
    skipped: list[RecordError] = []
    lines = read.lines or [None] * len(read.records)
    for i, (record, line) in enumerate(zip(read.records, lines, strict=True)):
        try:
            row = []
            for name in responses:
                try:
                    # A conversation's earlier turns go to the encoder, which templates them with the prompt.
                    history = getattr(record, "history", ())
                    extra = {"history": history} if history else {}
                    if image_tokens is not None:
                        extra["image_tokens"] = image_tokens[i]
                    row.append(encode(record.prompt, getattr(record, name), **extra))
                except ValueError as e:
                    message = str(e)
                    raise RecordError(
                        Path(read.path), line, _blamed_field(message, name), f"record {record.id!r}: {message}",
                        split=getattr(read, "split", None),
                    ) from None
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            skipped.append(e)
            continue
        kept.append(i)
        encoded.append(tuple(row))
    if skipped:
        if not kept:
            raise RecordError(read.path, None, None, f"no record can be encoded; first: {skipped[0]}",
                              split=getattr(read, "split", None))
        log.warning(
            "skipped %d of %d records in %s that cannot be encoded: first: %s",
            len(skipped), len(read.records), read.path, skipped[0],
        )
    return kept, encoded


def subset(items: Sequence[Any], kept: Sequence[int]) -> list[Any]:
    """``items`` at the positions ``kept``."""
    return [items[i] for i in kept]
