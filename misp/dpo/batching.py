"""The one concatenated forward batch of a preference step, and its split back into parts.

Rows, for B records and K negatives: ``[chosen on positive (B); rejected on positive (B); chosen on
each negative (B*K, record-major)]``. Images: the B positives then the B*K negatives, each encoded
once; ``image_index`` maps rows to them, so the positive serves both its chosen and rejected row.
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
    length = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])
    parts = {}
    for name, value in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
        chosen = _pad_to(getattr(batch.chosen, name), length, value)
        rejected = _pad_to(getattr(batch.rejected, name), length, value)
        parts[name] = torch.cat([chosen, rejected, chosen.repeat_interleave(k, dim=0)])
    device = parts["input_ids"].device
    positives = torch.arange(b, device=device)
    image_index = torch.cat([positives, positives, b + torch.arange(b * k, device=device)])
    return ConcatenatedRows(parts["input_ids"], parts["attention_mask"], parts["labels"], image_index, b, k)


def split_rows(values: torch.Tensor, b: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[2B + BK]`` per-row values -> (chosen [B], rejected [B], chosen under negatives [B, K])."""
    return values[:b], values[b : 2 * b], values[2 * b :].reshape(b, k)


RowKey = tuple[str, str, "NegativeRef | str"]
"""(record id, response, image): the image is ``"positive"`` or the negative's ``NegativeRef``."""


def row_keys(batch: PreferenceBatch) -> list[RowKey]:
    """A cache key per row: (record id, response, image), in the concatenated row order."""
    ids, negatives = batch.ids, batch.negatives
    return (
        [(rid, "chosen", "positive") for rid in ids]
        + [(rid, "rejected", "positive") for rid in ids]
        + [(rid, "chosen", key) for rid, keys in zip(ids, negatives, strict=True) for key in keys]
    )
