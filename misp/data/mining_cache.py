"""The mining pass of the preference data (one part of ``NegativeSamplerDataModule``), cached on disk.

For the records: read the pool, embed records and pool with CLIP, retrieve each record's candidates (with
its own images when ``mining.record_candidates`` mixes them in) and, for the ``sae`` source, score and
select them with the SAE. ``misp.negatives.mining`` keys each cache on what it was computed from, so
``prepare_data`` (one process per node) computes and writes them and ``setup`` on every rank reads them.
Sources that read no candidates (crop, noise, given, none) mine nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from misp.data.drawing import record_images
from misp.data.pool import read_pool
from misp.models.clip import ClipSpec, load_clip
from misp.negatives.edits import record_targets
from misp.negatives.mining import Candidates, MiningConfig, Selection, mine_candidates, select_negatives
from misp.negatives.sources import get_source
from misp.negatives.spec import Negatives
from misp.sae.io import SAEFormatError, load_sae

log = logging.getLogger(__name__)


class MiningPass:
    """Mines (or reads from the cache) the candidates and the SAE selection of a datamodule's records.

    Args:
        pool: the candidate pool (``NegativeSamplerDataModule(pool=...)``).
        pool_column: the image column of a dataset pool.
        split: the split of a dataset pool.
        clip: the CLIP that embeds records and pool.
        mining: retrieval and selection settings.
        sae_path: the SAE export that selects (``sae`` source).
        cache_dir: where embeddings, retrieval and selection are cached.
        records_file: where the records came from (messages; the root of their own images).
        image_root: the folder record image paths are relative to, if not the records file's.
    """

    def __init__(self, pool: str | None, pool_column: str, split: str, clip: ClipSpec | None, mining: MiningConfig,
                 sae_path: str | None, cache_dir: Path, records_file: str, image_root: str | None) -> None:
        self.pool, self.pool_column, self.split, self.clip, self.mining = pool, pool_column, split, clip, mining
        self.sae_path, self.cache_dir = sae_path, cache_dir
        self.records_file, self.image_root = records_file, image_root
        self.candidates: Candidates | None = None
        self.selection: Selection | None = None
        self.pool_paths: list[Path] = []
        self._warned_unused_own = False

    def run(self, records: list, negatives: Negatives | None, progress: bool) -> None:
        """Mine what ``negatives`` need (None: the SAE's difference vectors, which need the candidates), once."""
        source = get_source(negatives.source) if negatives is not None else None
        if source is not None and not source.needs_pool:
            self._warn_unused_record_candidates(negatives.source)
            return
        if self.candidates is not None:
            return
        if source is not None and source.targets and self.mining.record_candidates != "edits":
            raise ValueError(
                f"source {negatives.source!r} keeps each record's target edits among its selected negatives, so they "
                f"must be candidates: set data.init_args.mining.record_candidates: edits (it is "
                f"{self.mining.record_candidates!r})"
            )
        own = self._own_candidates(records)
        self.pool_paths = read_pool(
            self.pool, verify=True, column=self.pool_column, split=self.split, image_store=self.cache_dir / "images"
        )
        self._warn_small_pool()
        clip = load_clip(self.clip, device=self.mining.device)
        self.candidates = mine_candidates(
            [r.image for r in records], [r.prompt for r in records], self.pool_paths, clip,
            self.mining, self.cache_dir, progress=progress, own_images=own,
        )
        if source is not None and source.needs_sae:
            self.selection = self._select(progress, self._pinned(records) if source.targets else None)
        if negatives is not None:
            self._warn_repeats(negatives)

    def _pinned(self, records: list) -> torch.Tensor:
        """``[R, P]`` candidate indices of each record's target edits (-1 pads); warns when no record has one."""
        where = {Path(p).resolve(): i for i, p in enumerate(self.candidates.paths)}
        rows = [[where[Path(p).resolve()] for p in record_targets(r, self.records_file, self.image_root)]
                for r in records]
        if not any(rows):
            log.warning("no record in %s has a target edit (an edit with target: true, or a format-6 partner edit): "
                        "the selection and the draws are those of sae_pairs", self.records_file)
        pinned = torch.full((len(rows), max(map(len, rows), default=0) or 1), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            pinned[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        return pinned

    def _select(self, progress: bool, pinned: torch.Tensor | None = None) -> Selection:
        """The SAE's selection among the candidates (``pinned``: candidates kept first), after checking the
        SAE reads this data's embedding."""
        sae, meta = load_sae(self.sae_path)
        expected = self.candidates.joint.metadata()
        if meta.get("joint") is None:
            # Without it nothing says the SAE reads this CLIP's joint embedding: its scores may mean nothing.
            raise SAEFormatError(
                f"SAE {Path(self.sae_path) / 'sae.json'}: no 'joint' metadata (the joint embedding it was trained "
                "in); export it with SAEModule (`misp fit --config configs/shapes/sae.yaml`)"
            )
        if meta["joint"] != expected:
            raise SAEFormatError(
                f"the SAE in {self.sae_path} was trained in another joint embedding ({meta['joint']}) than "
                f"this data's ({expected}); retrain it or match clip/mining.proj_dim"
            )
        if sae.config.d_in != self.candidates.dim:
            raise SAEFormatError(
                f"SAE {self.sae_path}: input dimension {sae.config.d_in}, the data's difference vectors have "
                f"{self.candidates.dim}; retrain it on this data"
            )
        return select_negatives(self.candidates, sae, meta["identity"], self.mining, self.cache_dir, progress=progress,
                                pinned_index=pinned)

    def _own_candidates(self, records: list) -> list[list[Path]] | None:
        """Per record, the images ``mining.record_candidates`` adds to its candidates (None for ``none``).

        Raises when no record carries that list: the run would otherwise mine the pool alone while its
        config says it mixes. Warns, with the count, when only some do (those keep their retrieved ones).
        """
        kind = self.mining.record_candidates
        if kind == "none":
            return None
        lists = [[Path(p) for p in record_images(r, kind, self.records_file, self.image_root)] for r in records]
        missing = [r.id for r, x in zip(records, lists, strict=True) if not x]
        what = {"counterfactual": "meta.counterfactuals", "edits": "edits (or meta.captioned_counterfactuals)"}.get(kind, "negatives")
        if lists and len(missing) == len(lists):
            raise ValueError(
                f"mining.record_candidates={kind!r}: no record in {self.records_file} carries a `{what}` "
                f"list (e.g. record {missing[0]!r}); set mining.record_candidates to the list the records carry, "
                "or to 'none'"
            )
        if missing:
            log.warning(
                "mining.record_candidates=%r: %d of %d records in %s carry no `%s` (e.g. %s): their candidates are "
                "the retrieved pool images alone", kind, len(missing), len(lists), self.records_file, what,
                missing[:3],
            )
        return lists

    # degenerate settings: the run is correct, but not what the config suggests ----------------------
    def _warn_unused_record_candidates(self, source: str) -> None:
        if self.mining.record_candidates != "none" and not self._warned_unused_own:
            self._warned_unused_own = True
            log.warning(
                "mining.record_candidates=%r has no effect with source=%r, which mines no candidates (it applies "
                "to the sae and random sources and to serve: differences)", self.mining.record_candidates, source,
            )

    def _warn_small_pool(self) -> None:
        # (Repeated images are counted by read_pool.)
        n_pool, m = len(self.pool_paths), self.mining
        for option, value in (("mining.n_candidates", m.n_candidates), ("mining.pool_size", m.pool_size)):
            if n_pool < value:
                log.warning(
                    "the pool %s holds %d images, fewer than %s=%d: every record gets at most %d retrieved",
                    self.pool, n_pool, option, value, n_pool,
                )

    def _warn_repeats(self, negatives: Negatives) -> None:
        """Warn once, with the count, when K exceeds the candidates some records have (draws then repeat)."""
        source = get_source(negatives.source)
        valid = self.selection.valid if source.needs_sae else self.candidates.indices >= 0
        counts = valid.sum(1)
        short = int((counts < negatives.k).sum())
        if short:
            option = "mining.pool_size" if source.needs_sae else "mining.n_candidates"
            log.warning(
                "k=%d negatives are drawn from fewer candidates for %d of %d records (fewest: %d; %s=%d): their "
                "draws repeat negatives. Lower k or raise %s", negatives.k, short, len(counts), int(counts.min()),
                option, getattr(self.mining, option.split(".")[1]), option,
            )
