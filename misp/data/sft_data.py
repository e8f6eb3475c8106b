"""Supervised (image, prompt, response) data for the SFT stage, plus the evaluation sets."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from misp.data.encoding import encode_records, subset
from misp.data.eval_data import EvalData, eval_dataloaders
from misp.data.handshake import AttachesToModule
from misp.data.pixel_cache import PixelCache, pixel_values
from misp.data.records import SFTRecord, read_sft_records
from misp.hparams import save_plain_hyperparameters
from misp.models.prompting import collate_examples, encode_example, record_image_tokens


class _SFTDataset(Dataset):
    def __init__(self, records: list[SFTRecord], encoded: list[dict]) -> None:
        self.records = records
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[dict, Path, str]:
        # The image's path, not its pixels: the collate decodes it only when its pixel cache misses.
        return self.encoded[i], Path(self.records[i].image), self.records[i].id


class SFTDataModule(AttachesToModule, L.LightningDataModule):
    """Tokenised SFT examples (loss on response tokens only) and the POPE/CHAIR evaluation sets.

    Args:
        train_file: JSON Lines with ``id``, ``image``, ``prompt``, ``response``.
        evaluation: the POPE, captioning, MMVP and grounding sets ``test`` reports (the test split).
        validation: the sets validated on during fit (and by ``validate``); None = ``evaluation``, as
            before. On the Shapes world: the val split's files, so that no choice made on validation
            metrics (checkpoint, hyperparameters) ever sees the test split.
        val_limit: during fit, validate on only the first N questions and prompts (None = all).
        image_root: folder image paths are relative to (default: the file's folder).
        batch_size: examples per batch.
        max_length: longest tokenised example; longer responses are truncated from the right.
        num_workers: DataLoader worker processes.
        on_bad_record: ``raise`` on the first bad line, or ``skip`` and report the count.
        image_cache_mb: the memory bound, in MiB, of the cache of preprocessed training images
            (``misp.data.pixel_cache``), so that from the second epoch on an image is neither decoded nor
            preprocessed again; 0 turns it off. Bounded because the pixels are float32: a preprocessed
            LLaVA-1.5 image is 1.3 MB, so 100k images would not fit (the Shapes world's 64 x 64 ones are
            48 KiB each). The cache lives where batches are collated: with ``num_workers > 0`` each worker
            has its own, so the bound applies per worker, and the workers are kept across epochs
            (``persistent_workers``) for their caches to survive. The pixels are bitwise those without it.
    """

    def __init__(
        self,
        train_file: str,
        evaluation: EvalData | None = None,
        validation: EvalData | None = None,
        val_limit: int | None = 64,
        image_root: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        num_workers: int = 0,
        on_bad_record: str = "raise",
        image_cache_mb: int = 512,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        self.evaluation = evaluation or EvalData()
        self.validation = validation or self.evaluation
        self.train_set: _SFTDataset | None = None
        self.pixel_cache = PixelCache.from_mb(image_cache_mb)

    def setup(self, stage: str) -> None:
        self.processor = self.module_value("processor")
        if stage == "fit" and self.train_set is None:
            h = self.hparams
            read = read_sft_records(Path(h.train_file), image_root=h.image_root, on_bad_record=h.on_bad_record)
            kept, encoded = encode_records(
                read, ("response",), partial(encode_example, self.processor, max_length=h.max_length), h.on_bad_record,
                record_image_tokens(self.processor, [r.image for r in read.records]),  # None for fixed-count families
            )
            self.train_set = _SFTDataset(subset(read.records, kept), [e for (e,) in encoded])

    def _collate(self, items: list[tuple[dict, Path, str]]) -> dict:
        examples, images, ids = zip(*items, strict=True)
        batch = collate_examples(list(examples), pad_token_id=self.processor.tokenizer.pad_token_id)
        batch["pixel_values"] = pixel_values(self.processor, list(images), self.pixel_cache)
        batch["ids"] = list(ids)  # names the records of a batch in errors (misp.callbacks.FiniteLossGuard)
        return batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            # Each worker's pixel cache is only worth filling if the worker outlives the epoch.
            persistent_workers=self.hparams.num_workers > 0 and self.pixel_cache.enabled,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return eval_dataloaders(replace(self.validation, limit=self.hparams.val_limit), self.hparams.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        return eval_dataloaders(self.evaluation, self.hparams.num_workers)
