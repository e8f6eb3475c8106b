"""Response pairs in the data: each drawn edit's own response, tokenised, and the token span its edit changes.

A source that gives paired responses (``edits``, ``misp.negatives.edits``) draws refs that carry the edit's
own correct response ``y_k``. The datamodule encodes every record's edit responses once, at setup
(:func:`encode_edits`), so that a bad one fails the run at start-up naming its file, line and field; each
item then carries the encodings of its K drawn responses and their spans (:meth:`EditResponses.item`), and
:func:`collate_pairs` pads them into a ``misp.batch.ResponsePairRows``.

**The span rule** (:func:`edit_spans`). IC-VCO's single-image branch sums each log-prob over the tokens an
edit changes. misp finds them from the token ids alone, the same way for every data set: over the response
tokens of ``y_p`` and ``y_k`` (their labels, EOS included), strip the longest common prefix, then the longest
common suffix of what remains; the tokens left in each are its span. A one-attribute edit ("red" -> "purple")
gives the changed word's tokens in both; removing an object gives its sentence in ``y_p`` and an empty span
in ``y_k`` (and the reverse for an insertion), so the masked pair compares that sentence under the two
images. Identical responses give two empty spans (the masked pair is then 0 and sends no gradient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from misp.batch import NegativeRef, ResponsePairRows, TokenRows
from misp.data.records import OnBadRecord, ReadResult, RecordError
from misp.models.families.base import IMAGE_MARKER
from misp.models.prompting import IGNORE_INDEX, collate_examples, encode_example
from misp.negatives.edits import FIELD, missing_edits_reason, record_edits

log = logging.getLogger(__name__)


IN_CONTEXT_ANCHORS = {"first": " Answer based on the first image.", "second": " Answer based on the second image."}
"""IC-VCO's anchor prompts of its two-image branch: the first image is the positive, the second the edit."""
IN_CONTEXT_CELLS = (("first", None), ("first", "edit"), ("second", "edit"), ("second", None))
"""The in-context rows of each edit, in order: (anchor, response), None for y_p, "edit" for the edit's own:
``y_p | first``, ``y_k | first``, ``y_k | second``, ``y_p | second`` (``ResponseCells``' chosen, swapped,
own, chosen_edit)."""


def in_context_prompt(prompt: str, anchor: str) -> str:
    """The two-image prompt: both images (positive, then edit) before the record's prompt and its anchor."""
    return f"{IMAGE_MARKER}{IMAGE_MARKER}{prompt}{IN_CONTEXT_ANCHORS[anchor]}"


def response_ids(example: dict) -> list[int]:
    """The response's token ids of an encoded example (its labels that are scored, EOS included), in order."""
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def edit_spans(chosen: list[int], edited: list[int]) -> tuple[list[bool], list[bool]]:
    """The tokens of ``chosen`` and of ``edited`` inside the span the edit changes (the module docstring's rule)."""
    n = min(len(chosen), len(edited))
    p = 0
    while p < n and chosen[p] == edited[p]:
        p += 1
    s = 0
    while s < n - p and chosen[-1 - s] == edited[-1 - s]:
        s += 1
    return ([p <= t < len(chosen) - s for t in range(len(chosen))],
            [p <= t < len(edited) - s for t in range(len(edited))])


@dataclass
class EditResponses:
    """Every kept record's edit responses, encoded on the record's prompt, by record position and response."""

    encoded: list[dict[str, dict] | None]
    """Per record (in file order), its responses' encodings by response text (None: record left out)."""
    spans: bool = True
    """Whether items carry the edit spans (only terms with ``token_mask`` read them)."""
    in_context: list[dict[tuple[str, str], dict] | None] | None = None
    """Per record, its two-image rows' encodings by (anchor, response) (None: no term reads them)."""

    def item(self, i: int, chosen: dict, refs: list[NegativeRef]) -> dict:
        """The pair part of record ``i``'s item: its K drawn responses' encodings and spans.

        A draw without a response of its own (a retrieved image of a mixed pool) gets ``y_p``'s encoding as a
        placeholder and ``valid`` False, so the pair terms leave it out.
        """
        table = self.encoded[i] or {}
        valid = [ref.response is not None for ref in refs]
        responses = [table[ref.response] if ok else chosen for ref, ok in zip(refs, valid, strict=True)]
        out: dict = {"responses": responses, "valid": valid}
        if self.in_context is not None:
            ic = self.in_context[i]
            chosen_text = ic["chosen"]
            out["in_context"] = [[ic[(anchor, chosen_text if which is None else ref.response)] for ref in refs]
                                 for anchor, which in IN_CONTEXT_CELLS]
        if self.spans:
            ids = response_ids(chosen)
            spans = [edit_spans(ids, response_ids(e)) for e in responses]
            out["chosen_span"] = [c for c, _ in spans]
            out["own_span"] = [o for _, o in spans]
        return out


def encode_edits(
    read: ReadResult,
    encoded: list,
    processor,
    max_length: int,
    on_bad_record: OnBadRecord,
    records_file: str,
    image_root: str | None,
    spans: bool = True,
    require: bool = True,
    in_context: bool = False,
) -> EditResponses:
    """Encode each kept record's edit responses on its prompt, as its chosen response is encoded.

    A response longer than ``max_length`` allows is cut to fit (it then keeps no EOS), as ``truncation:
    truncate`` cuts chosen ones; the span rule then reads the cut ids. A record that carries no edits, or an
    edit that cannot be encoded, is a ``RecordError`` naming the file, line and field ``edits`` (with
    ``on_bad_record: skip``: left out, ``encoded[i]`` set to None, and counted in the raised error only when
    no record is left).

    Args:
        read: the records as read (their file and lines name them in errors).
        encoded: per record, its (chosen, rejected) encodings or None (left out); updated in place.
        processor: the VLM's processor.
        max_length: the datamodule's ``max_length``.
        on_bad_record: ``raise`` or ``skip``.
        records_file, image_root: where the Shapes world's captioned counterfactuals are relative to.
        spans: whether items carry the edit spans.
        require: a record without edits is an error (the ``edits`` source); False for a mixed pool, where
            such a record's draws are all retrieved images (no pairs).
        in_context: also encode IC-VCO's two-image rows (``in_context_prompt``) of ``y_p`` and each edit
            response, under both anchors (a model family that takes two images per prompt).
    """
    lines = read.lines or [None] * len(read.records)
    out: list[dict[str, dict] | None] = [None] * len(read.records)
    two: list | None = [None] * len(read.records) if in_context else None
    skipped: list[RecordError] = []
    for i, (record, line) in enumerate(zip(read.records, lines, strict=True)):
        if encoded[i] is None:
            continue
        try:
            edits = record_edits(record, records_file, image_root)
            if not edits and require:
                raise RecordError(Path(read.path), line, FIELD, f"record {record.id!r}: {missing_edits_reason()}",
                                  split=read.split)
            chosen = encoded[i][0]
            extra = {"history": record.history} if record.history else {}
            if "image_tokens" in chosen:
                extra["image_tokens"] = chosen["image_tokens"]
            table: dict[str, dict] = {}
            for j, (_, response) in enumerate(edits):
                if response in table:
                    continue
                try:
                    table[response] = encode_example(processor, record.prompt, response, max_length, **extra)
                except ValueError as e:
                    raise RecordError(Path(read.path), line, FIELD, f"record {record.id!r}: item {j}: {e}",
                                      split=read.split) from None
            if two is not None:
                extra.pop("image_tokens", None)  # two images: the forward counts them, max_length cuts the response
                ic: dict = {"chosen": record.chosen}
                for response in [record.chosen, *table]:
                    for anchor in IN_CONTEXT_ANCHORS:
                        try:
                            ic[(anchor, response)] = encode_example(
                                processor, in_context_prompt(record.prompt, anchor), response, max_length, **extra)
                        except ValueError as e:
                            raise RecordError(Path(read.path), line, FIELD,
                                              f"record {record.id!r}: the two-image prompt: {e}", split=read.split) from None
                two[i] = ic
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            skipped.append(e)
            encoded[i] = None
            continue
        out[i] = table
    if skipped:
        if all(e is None for e in encoded):
            raise RecordError(read.path, None, FIELD, f"no record has usable edits; first: {skipped[0]}", split=read.split)
        log.warning("skipped %d of %d records in %s without usable edits: first: %s",
                    len(skipped), len(read.records), read.path, skipped[0])
    return EditResponses(out, spans, two)


def collate_pairs(items: list[dict], pad_token_id: int) -> ResponsePairRows:
    """The pair parts of B items (K responses each) -> ``ResponsePairRows`` (record-major rows, padded spans)."""
    rows = collate_examples([e for it in items for e in it["responses"]], pad_token_id)
    responses = TokenRows(rows["input_ids"], rows["attention_mask"], rows["labels"])
    flags = [it.get("valid") for it in items]
    valid = None if all(f is None or all(f) for f in flags) else torch.tensor(flags, dtype=torch.bool)
    in_context = None
    if "in_context" in items[0]:
        ic = collate_examples([e for cell in range(len(IN_CONTEXT_CELLS)) for it in items for e in it["in_context"][cell]],
                              pad_token_id)
        in_context = TokenRows(ic["input_ids"], ic["attention_mask"], ic["labels"])
    if "chosen_span" not in items[0]:
        return ResponsePairRows(responses, valid=valid, in_context=in_context)

    def padded(name: str) -> torch.Tensor:
        width = max((len(s) for it in items for s in it[name]), default=0)
        k = len(items[0][name])
        mask = torch.zeros(len(items), k, width, dtype=torch.bool)
        for r, it in enumerate(items):
            for j, s in enumerate(it[name]):
                mask[r, j, : len(s)] = torch.tensor(s, dtype=torch.bool)
        return mask

    return ResponsePairRows(responses, padded("chosen_span"), padded("own_span"), in_context, valid)
