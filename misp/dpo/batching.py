"""The one concatenated forward batch of a preference step, and its split back into parts.

Rows, for B records and K negatives: ``[chosen on positive (B); rejected on positive (B); chosen on
each negative (B*K, record-major)]``. Images: the B positives then the B*K negatives, each encoded
once; ``image_index`` maps rows to them, so the positive serves both its chosen and rejected row.

With response pairs (``PreferenceBatch.pairs``: each negative's own response ``y_k``) two more blocks follow,
``[y_k on negative k (B*K); y_k on the positive (B*K)]``, record-major, reading the same images: the rows
``(m_k, y_k)`` and ``(m_p, y_k)`` of the pairs (``split_pair_rows``). With IC-VCO's two-image rows
(``ResponsePairRows.in_context``) four blocks of B*K more follow, each row reading two images ``[m_p, m_k]``
(two entries of ``image_index``, one per image slot; ``split_in_context``). Without pairs the rows are exactly
the three blocks above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from misp.batch import NegativeRef, PreferenceBatch


@dataclass
class ConcatenatedRows:
    """The ``2B + BK`` rows of one forward, and which of the batch's images each row reads."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    batch_size: int
    k: int
    pairs: bool = False
    """Whether the two response-pair blocks follow the first three."""
    in_context: bool = False
    """Whether the four two-image blocks follow the pair blocks (their rows hold two image slots each)."""
    slots: torch.Tensor | None = None
    """``[N]`` image slots per row when some row holds more than one (None: one each, ``image_index`` per row)."""


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def concatenate_rows(batch: PreferenceBatch, pad_token_id: int, k: int | None = None) -> ConcatenatedRows:
    """Stack chosen, rejected and chosen-per-negative rows (right padding to one length).

    ``k``: the method's K (``Method.negatives.drawn``), which the batch must carry; None takes the batch's.
    """
    b = batch.batch_size
    if k is not None and batch.k != k:
        raise ValueError(f"the batch carries {batch.k} negative(s) per record, the method draws {k}: the data was "
                         "not attached to this module (`datamodule.attach(module)`)")
    k = batch.k
    pairs = batch.pairs.responses if batch.pairs is not None and k else None
    two = batch.pairs.in_context if pairs is not None else None
    length = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])
    if pairs is not None:
        length = max(length, pairs.input_ids.shape[1])
    if two is not None:
        length = max(length, two.input_ids.shape[1])
    parts = {}
    for name, value in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
        chosen = _pad_to(getattr(batch.chosen, name), length, value)
        rejected = _pad_to(getattr(batch.rejected, name), length, value)
        blocks = [chosen, rejected, chosen.repeat_interleave(k, dim=0)]
        if pairs is not None:
            own = _pad_to(getattr(pairs, name), length, value)
            blocks += [own, own]
        if two is not None:
            blocks.append(_pad_to(getattr(two, name), length, value))
        parts[name] = torch.cat(blocks)
    device = parts["input_ids"].device
    positives = torch.arange(b, device=device)
    negatives = b + torch.arange(b * k, device=device)
    blocks = [positives, positives, negatives]
    if pairs is not None:
        blocks += [negatives, positives.repeat_interleave(k)]
    slots = None
    if two is not None:
        # each two-image row reads [m_p, m_k]: slots in row order, the four cells alike
        pair_slots = torch.stack([positives.repeat_interleave(k), negatives], dim=1).reshape(-1)
        blocks += [pair_slots] * 4
        n = parts["input_ids"].shape[0]
        slots = torch.ones(n, dtype=torch.long, device=device)
        slots[n - 4 * b * k :] = 2
    image_index = torch.cat(blocks)
    return ConcatenatedRows(parts["input_ids"], parts["attention_mask"], parts["labels"], image_index, b, k,
                            pairs is not None, two is not None, slots)


def split_rows(values: torch.Tensor, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[2B + BK (+ 2BK), ...]`` per-row values -> (chosen [B], rejected [B], chosen under negatives [B, K])."""
    return values[:b], values[b : 2 * b], values[2 * b : 2 * b + b * k].reshape(b, k, *values.shape[1:])


def split_pair_rows(values: torch.Tensor, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The response-pair blocks of ``[2B + 3BK, ...]`` per-row values -> (y_k under m_k, y_k under m_p), each
    ``[B, K, ...]``."""
    start = 2 * b + b * k
    own = values[start : start + b * k]
    swapped = values[start + b * k : start + 2 * b * k]
    return own.reshape(b, k, *own.shape[1:]), swapped.reshape(b, k, *swapped.shape[1:])


def split_in_context(values: torch.Tensor, b: int, k: int) -> tuple[torch.Tensor, ...]:
    """The four two-image blocks of ``[2B + 7BK, ...]`` per-row values -> (y_p | first, y_k | first, y_k | second,
    y_p | second), each ``[B, K, ...]`` (``ResponseCells``' chosen, swapped, own, chosen_edit)."""
    start = 2 * b + 3 * b * k
    cells = values[start : start + 4 * b * k]
    return tuple(cells[c * b * k : (c + 1) * b * k].reshape(b, k, *cells.shape[1:]) for c in range(4))


def select_rows(rows: ConcatenatedRows, need: torch.Tensor) -> tuple[ConcatenatedRows, torch.Tensor]:
    """The rows ``need`` alone, and the batch's images they read (``image_index`` remapped to those)."""
    if rows.slots is None:
        index = rows.image_index[need]
    else:
        starts = torch.cumsum(rows.slots, 0) - rows.slots
        index = rows.image_index[torch.cat([torch.arange(int(starts[i]), int(starts[i] + rows.slots[i]))
                                            for i in need.tolist()]).to(rows.image_index.device)]
    images, image_index = index.unique(return_inverse=True)
    subset = ConcatenatedRows(rows.input_ids[need], rows.attention_mask[need], rows.labels[need], image_index,
                              rows.batch_size, rows.k, rows.pairs, rows.in_context,
                              None if rows.slots is None else rows.slots[need])
    return subset, images


RowKey = tuple[str, str, "NegativeRef | str"]
"""(record id, response, image): the image is ``"positive"`` or the negative's ``NegativeRef``."""


def row_keys(batch: PreferenceBatch) -> list[RowKey]:
    """A cache key per row: (record id, response, image), in the concatenated row order.

    A pair row's response is the edit's own, ``"response:" + y_k``; its image is the negative's ref (which
    carries ``y_k`` too) or ``"positive"``.
    """
    ids, negatives = batch.ids, batch.negatives
    keys: list[RowKey] = (
        [(rid, "chosen", "positive") for rid in ids]
        + [(rid, "rejected", "positive") for rid in ids]
        + [(rid, "chosen", key) for rid, keys in zip(ids, negatives, strict=True) for key in keys]
    )
    if batch.pairs is not None and batch.k:
        drawn = [(rid, ref) for rid, refs in zip(ids, negatives, strict=True) for ref in refs]
        # A draw without its own response holds y_p as a placeholder: those rows are (y_p, m_k) and (y_p, m_p).
        keys += [(rid, "chosen" if ref.response is None else f"response:{ref.response}", ref) for rid, ref in drawn]
        keys += [(rid, "chosen" if ref.response is None else f"response:{ref.response}", "positive") for rid, ref in drawn]
        if batch.pairs.in_context is not None:
            # two-image rows: the context is (m_p, m_k) with its anchor; the ref names m_k and y_k
            for anchor, which in (("first", "chosen"), ("first", "response"), ("second", "response"), ("second", "chosen")):
                keys += [(rid, f"in_context:{anchor}:{which}", ref) for rid, ref in drawn]
    return keys
