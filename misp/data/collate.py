"""One epoch of preference examples and their collation into a ``misp.batch.PreferenceBatch``.

The positive and the negatives that are files travel as paths, decoded by the collate only when the pixel
cache misses; the negatives a source makes from the positive (crop, noise) are made afresh each time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from misp.batch import PreferenceBatch, TokenRows
from misp.data.pairs import EditResponses, collate_pairs
from misp.data.pixel_cache import PixelCache, image_inputs
from misp.images import load_rgb
from misp.models.prompting import collate_examples
from misp.negatives.sources import NegativeDraws, materialise


class PreferenceEpoch(Dataset):
    """One epoch's preference examples, each with its K drawn negatives (records encoded as None are left out).

    Args:
        records: the preference records, in file order (``draws`` is indexed by the same positions).
        encoded: per record, its (chosen, rejected) encoded examples, or None when it was left out.
        draws: this epoch's negatives (None: the method draws none).
        pairs: each record's edit responses, for a source that pairs responses (None: no pairs).
    """

    def __init__(self, records, encoded: list, draws: NegativeDraws | None, pairs: EditResponses | None = None) -> None:
        self.records, self.encoded, self.draws, self.pairs = records, encoded, draws, pairs
        self.kept = [i for i, e in enumerate(encoded) if e is not None]

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, j: int) -> dict:
        i = self.kept[j]
        r = self.records[i]
        refs = self.draws.refs[i] if self.draws is not None else []
        item = {
            "id": r.id,
            "chosen": self.encoded[i][0],
            "rejected": self.encoded[i][1],
            "positive": Path(r.image),
            "negatives": [Path(ref.path) if ref.names_file else materialise(ref, r.image, load_rgb) for ref in refs],
            "refs": list(refs),
            "log_q": self.draws.log_q[i] if self.draws is not None else torch.zeros(0),
            "draw_index": self.draws.draw_index[i] if self.draws is not None else torch.zeros(0, dtype=torch.long),
        }
        if self.pairs is not None:
            item["pairs"] = self.pairs.item(i, self.encoded[i][0], refs)
        return item


def collate_preferences(items: list[dict], processor, cache: PixelCache | None = None) -> PreferenceBatch:
    """``PreferenceEpoch`` items -> one ``PreferenceBatch`` (images through ``image_inputs``, the one way)."""
    pad = processor.tokenizer.pad_token_id
    chosen = collate_examples([it["chosen"] for it in items], pad)
    rejected = collate_examples([it["rejected"] for it in items], pad)
    images = [it["positive"] for it in items] + [img for it in items for img in it["negatives"]]
    return PreferenceBatch(
        ids=[it["id"] for it in items],
        chosen=TokenRows(chosen["input_ids"], chosen["attention_mask"], chosen["labels"]),
        rejected=TokenRows(rejected["input_ids"], rejected["attention_mask"], rejected["labels"]),
        images=image_inputs(processor, images, cache),
        negatives=[it["refs"] for it in items],
        log_q=torch.stack([it["log_q"] for it in items]).float(),
        draw_index=torch.stack([it["draw_index"] for it in items]),
        pairs=collate_pairs([it["pairs"] for it in items], pad) if "pairs" in items[0] else None,
    )
