"""Image-caption data for the contrastive CLIP stage."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from misp.data.handshake import AttachesToModule
from misp.data.records import CaptionRecord, read_caption_records
from misp.images import load_rgb
from misp.models.clip import train_transform


class _CaptionDataset(Dataset):
    def __init__(self, records: list[CaptionRecord], transform) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        r = self.records[i]
        return self.transform(load_rgb(r.image)), r.caption, r.id


class ClipDataModule(AttachesToModule, L.LightningDataModule):
    """Serves (image, caption) pairs from a caption JSON Lines file (the world's ``clip.jsonl``).

    The transforms and tokenizer come from the module being trained, so a config names the data once.

    Args:
        train_file: JSON Lines with ``id``, ``image``, ``caption``.
        image_root: folder image paths are relative to (default: the file's folder).
        val_size: records held out (the last ones) to measure retrieval accuracy.
        batch_size: pairs per batch; contrastive learning gets harder and better with more.
        num_workers: DataLoader worker processes.
        on_bad_record: ``raise`` on the first bad line, or ``skip`` and report the count.
    """

    def __init__(
        self,
        train_file: str,
        image_root: str | None = None,
        val_size: int = 256,
        batch_size: int = 128,
        num_workers: int = 0,
        on_bad_record: str = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: _CaptionDataset | None = None
        self.val_set: _CaptionDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        records = read_caption_records(
            Path(h.train_file), image_root=h.image_root, on_bad_record=h.on_bad_record
        ).records
        if len(records) <= h.val_size:
            raise ValueError(f"{h.train_file}: {len(records)} records, need more than val_size={h.val_size}")
        bundle = self.module_value("clip")
        train, val = records[: len(records) - h.val_size], records[len(records) - h.val_size :]
        self.train_set = _CaptionDataset(train, train_transform(bundle))
        self.val_set = _CaptionDataset(val, bundle.preprocess)
        self._tokenizer = bundle.tokenizer

    def _collate(self, items: list[tuple[torch.Tensor, str, str]]) -> dict:
        images, captions, ids = zip(*items, strict=True)
        # ids name the records of a batch in errors (misp.callbacks.FiniteLossGuard).
        return {"images": torch.stack(images), "tokens": self._tokenizer(list(captions)), "ids": list(ids)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers, collate_fn=self._collate
        )
