"""NegativeSamplerDataModule: the data of the SAE and of every preference-optimisation method.

Mining (CLIP embedding, retrieval, SAE scoring, greedy selection) runs once in ``prepare_data`` on one
process per node and is cached, so every rank then loads identical results in ``setup``. Each epoch
(``reload_dataloaders_every_n_epochs=1``) ``train_dataloader`` draws K negatives per record from the
method's source (``misp.negatives.spec.Negatives``, handed over by the module in ``attach``: K has one home,
the method), the ``sae`` source through the DPO module's current proposal q_phi.

With ``serve: differences`` it serves difference vectors ``d = e(m_p, x) - e(m_i, x)`` for SAEModule;
with ``serve: preferences`` a ``misp.batch.PreferenceBatch`` per step for MISPDPOModule. What the module
needs from it (the evaluation sets, q_phi's features by record, the difference vectors) it hands over
once, in ``attach`` (``misp.data.handshake``), where it takes the method's negatives in return.

Its parts: mining (``misp.data.mining_cache``, cached), per-epoch drawing (``misp.data.drawing``), encoding and collation
(``misp.data.collate``), and the resume state (``misp.data.epoch_state``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from misp.data.collate import PreferenceEpoch, collate_preferences
from misp.data.drawing import NegativeDrawer
from misp.data.encoding import encode_records
from misp.data.epoch_state import EpochState
from misp.data.eval_data import EvalData, eval_dataloaders
from misp.data.handshake import (
    AttachesToModule,
    DataDescription,
    DifferenceVectors,
    ModuleValues,
    NegativesDescription,
    ProposalFeatures,
    not_attached,
)
from misp.data.layouts import RatingRule
from misp.data.mining_cache import MiningPass
from misp.data.pairs import EditResponses, encode_edits
from misp.data.pixel_cache import PixelCache
from misp.data.preview import log_negatives_preview
from misp.data.records import PreferenceRecord, read_preference_records
from misp.data.sampler import EpochShuffleSampler, ResumableDataLoader
from misp.errors import ConfigError
from misp.hparams import save_plain_hyperparameters
from misp.models.clip import ClipSpec
from misp.models.prompting import (
    encode_example,
    encode_preference_records,
    record_image_tokens,
)
from misp.negatives.mining import Candidates, MiningConfig, Selection
from misp.negatives.sources import NegativeDraws, get_source, uniform_log_q
from misp.negatives.spec import Negatives

log = logging.getLogger(__name__)


class _DifferenceVectors(Dataset):
    def __init__(self, pairs: torch.Tensor) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pairs[i]


def _rating_rule(value: RatingRule | dict | None) -> RatingRule | None:
    # Under LightningCLI a dataclass argument may arrive as its dict form.
    if value is None or isinstance(value, RatingRule):
        return value
    return RatingRule(**{k: tuple(v) if k == "aspects" else v for k, v in dict(value).items()})


class NegativeSamplerDataModule(AttachesToModule, L.LightningDataModule):
    """Preference records, the candidate pool, mined negatives and per-epoch importance sampling.

    Args:
        records_file: preference records: a JSON Lines file or a JSON array, or a dataset as published (a
            ``.parquet`` or ``.arrow`` file, a dataset folder or a hub id; docs/data.md); see ``layout``.
        serve: what the dataloaders yield: ``preferences`` (preference batches for MISPDPOModule) or
            ``differences`` (CLIP-space difference vectors for SAEModule). Not to be confused with the
            method's ``negatives.source: sae``, the negatives an SAE selected. The negatives' source and K
            are the method's (``model.init_args.method.negatives``), handed over in ``attach``.
        pool: the candidate pool: a JSON Lines file with ``image`` rows, a folder of images, or a dataset
            whose ``pool_column`` holds the images (embedded or paths).
        clip: the CLIP that embeds records and pool (needed by the sae and random sources and to serve differences).
        sae_path: a directory written by SAEModule's export (needed by the sae source; unused by the others,
            so a world's base config may name it for every method).
        mining: retrieval and selection settings; ``mining.record_candidates`` adds each record's own images
            (counterfactual renders or its ``negatives``) to its retrieved candidates (the mixed pool).
        evaluation: the POPE, captioning, MMVP and grounding sets ``test`` reports (the test split).
        validation: the sets validated on during fit (and by ``validate``); None = ``evaluation``, as
            before. On the Shapes world: the val split's files, so that no choice made on validation
            metrics (checkpoint, hyperparameters) ever sees the test split.
        val_limit: during fit, validate on only the first N questions and prompts.
        image_root: folder image paths are relative to (default: the records file's folder).
        layout: record layout: misp, mdpo, rlhfv, rlaifv, trl, sharegpt, povid, swift or vlfeedback
            (docs/data.md).
        key_map: misp field -> source key (column), overriding the layout's, e.g.
            ``--data.init_args.key_map '{prompt: question}'``.
        split: the split of a dataset ``records_file`` (and ``pool``) to read.
        revision: the revision (branch, tag, commit) of a hub dataset.
        streaming: stream a dataset's rows rather than memory-map a prepared Arrow copy.
        ratings: how VLFeedback's rated completions become a pair (layout ``vlfeedback``).
        pool_column: the image column of a dataset ``pool``.
        on_bad_record: ``raise`` on the first bad record, or ``skip`` and report the count.
        cache_dir: where embeddings, retrieval and selection are cached.
        batch_size: records per DPO batch (each expands to 2 + K sequences).
        sae_batch_size: difference vectors per SAE batch.
        sae_val_fraction: share of records whose pairs are held out to validate the SAE.
        max_length: longest tokenised example (prompt with its image tokens, plus the response).
        truncation: a record whose chosen or rejected example is longer than ``max_length``: ``skip`` it
            (counted in a warning), ``truncate`` both responses to fit (a cut response keeps no EOS: it is
            unfinished), or ``raise``.
        num_workers: DataLoader worker processes.
        image_cache_mb: the memory bound, in MiB, of the cache of preprocessed image files (positives and
            file negatives, ``misp.data.pixel_cache``), so that an image seen before is neither decoded nor
            preprocessed again; 0 turns it off. Bounded because the pixels are float32 (1.3 MB per
            LLaVA-1.5 image: 100k would not fit). It lives where batches are collated: in this process
            with ``num_workers=0``, where it lasts the whole run; with workers, in each worker, which this
            datamodule starts afresh every epoch (new draws, new loader), so there it only reuses images
            within an epoch. Crops and noisings are never cached. The pixels are bitwise those without it.
        seed: seeds the per-epoch draws (with the epoch and record id) and the SAE data split.
        preview_records: records shown each epoch in the logger's negatives preview (0: none).
        progress: progress bars during mining.
    """

    def __init__(
        self,
        records_file: str,
        serve: Literal["preferences", "differences"] = "preferences",
        pool: str | None = None,
        clip: ClipSpec | None = None,
        sae_path: str | None = None,
        mining: MiningConfig | None = None,
        evaluation: EvalData | None = None,
        validation: EvalData | None = None,
        val_limit: int | None = 64,
        image_root: str | None = None,
        layout: str = "misp",
        key_map: dict[str, str] | None = None,
        split: str = "train",
        revision: str | None = None,
        streaming: bool = False,
        ratings: RatingRule | None = None,
        pool_column: str = "image",
        on_bad_record: Literal["raise", "skip"] = "raise",
        cache_dir: str = "cache",
        batch_size: int = 8,
        sae_batch_size: int = 1024,
        sae_val_fraction: float = 0.05,
        max_length: int = 256,
        truncation: Literal["skip", "truncate", "raise"] = "skip",
        num_workers: int = 0,
        image_cache_mb: int = 512,
        seed: int = 0,
        preview_records: int = 4,
        progress: bool = True,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        if serve == "differences" and (pool is None or clip is None):
            raise ValueError("serve='differences' needs both `pool` and `clip`")
        # Dataclass arguments are kept as given: under LightningCLI `hparams` holds their raw dict form.
        self.clip = clip
        self.mining = mining or MiningConfig()
        self.ratings = ratings
        self.evaluation = evaluation or EvalData()
        self.validation = validation or self.evaluation
        self.records: list[PreferenceRecord] | None = None
        self.mined = MiningPass(pool, pool_column, split, self.clip, self.mining, sae_path, Path(cache_dir),
                                records_file, image_root)
        self.negatives: Negatives | None = None  # the method's, from `attach`
        self.drawer: NegativeDrawer | None = None
        self.epoch_state = EpochState()
        self.pairs: EditResponses | None = None  # each record's edit responses (a source pairing responses)
        self.in_context = False  # a term reads IC-VCO's two-image rows (from `attach`)
        self.pixel_cache = PixelCache.from_mb(image_cache_mb)

    # the method's negatives, from the handshake ----------------------------------------------------
    def take_values(self, values: ModuleValues) -> None:
        """Take the method's negatives (a module that names none gets batches without negatives) and check
        that this data has what their source needs."""
        if self.hparams.serve != "preferences":
            return
        negatives = values.negatives or Negatives()
        source, h = get_source(negatives.source), self.hparams
        missing = [name for name, value, needed in (
            ("pool", h.pool, source.needs_pool), ("clip", self.clip, source.needs_pool),
            ("sae_path", h.sae_path, source.needs_sae)) if needed and value is None]
        if missing:
            raise ConfigError(
                f"the method's negatives.source={negatives.source!r} needs data.init_args.{' and data.init_args.'.join(missing)}"
                + (" (the export_dir of a trained SAEModule)" if "sae_path" in missing else "")
            )
        self.negatives = negatives
        self.in_context = bool(values.in_context)
        self.drawer = NegativeDrawer(negatives.source, negatives.k, h.seed, h.records_file, h.image_root)

    def _negatives(self) -> Negatives:
        if self.negatives is None:
            raise not_attached(self, "module's negatives")
        return self.negatives

    @property
    def k(self) -> int:
        """K as drawn (the method's ``negatives.drawn``): a batch carries exactly this many columns."""
        return self._negatives().drawn

    # mining ---------------------------------------------------------------------------------------

    def _read_records(self) -> list[PreferenceRecord]:
        h = self.hparams
        self._read = read_preference_records(
            h.records_file, image_root=h.image_root, layout=h.layout, key_map=h.key_map,
            on_bad_record=h.on_bad_record, dataset_split=h.split, dataset_revision=h.revision,
            streaming=h.streaming, image_store=self._cache_dir() / "images", ratings=_rating_rule(self.ratings),
        )
        return self._read.records

    def _cache_dir(self) -> Path:
        return Path(self.hparams.cache_dir)

    def _mine(self, progress: bool) -> None:
        """Read the records and run the mining pass their negatives (or the SAE's vectors) need, once."""
        if self.records is None:
            self.records = self._read_records()
        differences = self.hparams.serve == "differences"
        self.mined.run(self.records, None if differences else self._negatives(), progress)

    @property
    def candidates(self) -> Candidates | None:
        """Every record's mined candidates (None until mined, and for sources that need none)."""
        return self.mined.candidates

    @property
    def selection(self) -> Selection | None:
        """The SAE's selection among them (``sae`` source only)."""
        return self.mined.selection

    @property
    def pool_paths(self) -> list[Path]:
        """The pool's images, as mined."""
        return self.mined.pool_paths

    def prepare_data(self) -> None:
        # One process per node mines and writes the caches; setup() on every rank then reads them.
        self._mine(progress=self.hparams.progress)

    def setup(self, stage: str) -> None:
        self._mine(progress=False)
        if self.hparams.serve == "preferences" and stage == "fit" and not hasattr(self, "encoded"):
            self.processor = self.module_value("processor")
            # A record left out by encoding stays in the mined arrays (indexed by position) but is encoded as
            # None, which the epoch leaves out.
            self.encoded = self.encode_pairs(self.processor)[0]
            source = get_source(self._negatives().source)
            if source.paired_responses and self.k > 0:
                h = self.hparams
                # A pool source pairs only the draws that are a record's own edits: a record without any is fine.
                self.pairs = encode_edits(self._read, self.encoded, self.processor, h.max_length, h.on_bad_record,
                                          h.records_file, h.image_root, spans=source.edit_spans,
                                          require=not source.needs_pool,
                                          in_context=self.in_context and source.in_context)

    def encode_pairs(self, processor: Any) -> tuple[list[tuple[dict, dict] | None], list[tuple[dict, dict] | None]]:
        """Each record's (chosen, rejected) encoding as training uses it, and as encoded before ``max_length``.

        Errors in a record's text name the file, line and record (``encode_records``, which encodes each pair
        once); then each kept pair is judged against ``max_length`` as one (``truncation``). Both lists hold
        None for a record left out (the first also for a pair ``truncation`` skips). ``misp data inspect``
        calls this too, so that it reports what a fit will see.
        """
        if self.records is None:
            self.records = self._read_records()
        h = self.hparams
        read = self._read
        kept, full = encode_records(read, ("chosen", "rejected"), partial(encode_example, processor), h.on_bad_record)
        records = [read.records[i] for i in kept]
        # Dynamic-resolution families: each image's token count from its file header, so max_length is judged
        # on the rows the model will see.
        image_tokens = record_image_tokens(processor, [r.image for r in records])
        pairs = encode_preference_records(processor, records, h.max_length, h.truncation, h.records_file, full, image_tokens)
        encoded: list = [None] * len(self.records)
        unlimited: list = [None] * len(self.records)
        for i, pair, whole in zip(kept, pairs, full, strict=True):
            encoded[i], unlimited[i] = pair, whole
        return encoded, unlimited

    # the handshake: what the module learns of this data ------------------------------------------
    def describe(self) -> DataDescription:
        """The evaluation sets, and the negatives (serving preferences) or the difference vectors."""
        description = super().describe()
        if self.hparams.serve == "differences":
            description.differences = DifferenceVectors(
                dim=lambda: self.difference_dim, sample=self.sample_differences, metadata=self.sae_metadata
            )
        else:
            description.negatives = NegativesDescription(self.proposal_features)
        return description

    def proposal_features(self) -> ProposalFeatures | None:
        """q_phi's features of every record's selected negatives, by record id (None without an SAE selection).

        Built once (the selection is fixed once mined); the module reads it every step."""
        sel = self.selection
        if sel is None:
            return None
        if getattr(self, "_proposal_features", None) is None or self._proposal_features.features is not sel.features:
            self._proposal_features = ProposalFeatures(sel.features, sel.valid, {r.id: i for i, r in enumerate(self.records)})
        return self._proposal_features

    # serving differences (SAEModule) --------------------------------------------------------------
    @property
    def difference_dim(self) -> int:
        self._mine(progress=self.hparams.progress)
        return self.candidates.dim

    def sae_metadata(self) -> dict:
        return {"joint": self.candidates.joint.metadata(), "candidates": self.candidates.key}

    def _sae_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = self.candidates.valid_pairs()
        n_records = self.candidates.indices.shape[0]
        generator = torch.Generator().manual_seed(self.hparams.seed)
        order = torch.randperm(n_records, generator=generator)
        n_val = max(1, int(round(self.hparams.sae_val_fraction * n_records))) if n_records > 1 else 0
        is_val = torch.zeros(n_records, dtype=torch.bool)
        is_val[order[:n_val]] = True
        held = is_val[pairs[:, 0]]
        return pairs[~held], pairs[held]

    def sample_differences(self, n: int) -> torch.Tensor:
        """Up to ``n`` training difference vectors (seeded), e.g. to set the SAE's pre-bias."""
        train, _ = self._sae_split()
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.hparams.seed))[:n]
        return self.candidates.pair_differences(train[pick])

    def _pairs_collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return self.candidates.pair_differences(torch.stack(items))

    # serving preferences (MISPDPOModule) ----------------------------------------------------------
    def _proposal_log_q(self) -> torch.Tensor:
        """log q over each record's M selected negatives from the module's current q_phi (uniform without one)."""
        sel = self.selection
        read = self._module_values.proposal_log_q if self._module_values is not None else None
        # The module gathers q_phi when it is sharded; every rank builds its dataloader, so all take part.
        log_q = read(sel.features, sel.valid) if read is not None else None
        return uniform_log_q(sel.valid) if log_q is None else log_q

    def draws_for_epoch(self, epoch: int) -> NegativeDraws | None:
        """The K negatives of every record for ``epoch`` (a pure function of seed, epoch and record ids)."""
        return self.drawer.draw(
            epoch, self.records, self.candidates, self.selection,
            lambda: self.epoch_state.proposal_log_q(epoch, self._proposal_log_q),
        )

    # dataloaders ----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if h.serve == "differences":
            train, _ = self._sae_split()
            return DataLoader(_DifferenceVectors(train), batch_size=h.sae_batch_size, shuffle=True, drop_last=True,
                              num_workers=h.num_workers, collate_fn=self._pairs_collate)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        draws = self.draws_for_epoch(epoch)
        dataset = PreferenceEpoch(self.records, self.encoded, draws, self.pairs)
        if self.trainer is not None and self.trainer.is_global_zero and draws is not None and h.preview_records:
            log_negatives_preview(self.trainer, self, dataset, draws, epoch, h.preview_records)
        # Shuffle order is a function of (seed, epoch) too, so a resumed run sees the same batches; resumed
        # mid-epoch, it starts after the batches the checkpoint had done.
        sampler = EpochShuffleSampler(len(dataset), h.seed, epoch, skip=self.epoch_state.resumed_batches(epoch) * h.batch_size)
        return ResumableDataLoader(dataset, batch_size=h.batch_size, sampler=sampler, drop_last=False,
                                   num_workers=h.num_workers,
                                   collate_fn=partial(collate_preferences, processor=self.processor, cache=self.pixel_cache))

    # checkpointed state: the position in the epoch, and the proposal's log q of the epoch ----------------
    def state_dict(self) -> dict:
        """Where the epoch under way stands, and the proposal log q its negatives were drawn from."""
        if self.trainer is None or self.hparams.serve != "preferences":
            return {}
        # `processed` counts the batch whose on_train_batch_end writes this checkpoint; `completed` not yet.
        done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return self.epoch_state.state_dict(self.trainer.current_epoch, done)

    def load_state_dict(self, state: dict) -> None:
        self.epoch_state.load_state_dict(state)

    def val_dataloader(self):
        h = self.hparams
        if h.serve == "differences":
            _, val = self._sae_split()
            return DataLoader(_DifferenceVectors(val), batch_size=h.sae_batch_size, num_workers=h.num_workers,
                              collate_fn=self._pairs_collate)
        return eval_dataloaders(replace(self.validation, limit=h.val_limit), h.num_workers)

    def test_dataloader(self):
        return eval_dataloaders(self.evaluation, self.hparams.num_workers)
