"""Each epoch's negatives of every record, drawn from the configured source (one part of the datamodule).

Draws are a pure function of (seed, epoch, record id), so a resumed run draws what an uninterrupted one
would, on every rank. The mined candidates and the SAE selection are read where they are when an epoch
is drawn (the datamodule mines them first); the pool sources' refs carry each image's index in the
candidate list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from misp.batch import NegativeRef
from misp.negatives.edits import SOURCE as EDITS
from misp.negatives.edits import edit_refs, record_edits, record_targets
from misp.negatives.mining import Candidates, Selection
from misp.negatives.sources import DrawContext, NegativeDraws, get_source

log = logging.getLogger(__name__)


def record_images(record, kind: str, records_file: str, image_root: str | None) -> list[str]:
    """The image files a record carries: its ``given`` negatives, its ``counterfactual`` renders
    (``meta.counterfactuals``, relative to ``image_root`` or the records file's folder), or its ``edits``
    (``misp.negatives.edits``: images with their own responses)."""
    if kind == "given":
        return [str(p) for p in record.negatives]
    if kind == EDITS:
        return [path for path, _ in record_edits(record, records_file, image_root)]
    root = Path(image_root) if image_root else Path(records_file).parent
    return [str(root / p) for p in record.meta.get("counterfactuals", [])]


class NegativeDrawer:
    """Draws each epoch's K negatives per record from ``source``.

    Args:
        source: the registered source's name.
        k: negatives per record.
        seed: the run's seed.
        records_file: where the records came from (messages, and the root of counterfactual renders).
        image_root: the folder image paths are relative to, if not the records file's.
    """

    def __init__(self, source: str, k: int, seed: int, records_file: str, image_root: str | None) -> None:
        self.source, self.k, self.seed = source, k, seed
        self.records_file, self.image_root = records_file, image_root
        self._warned_short_lists = False

    def draw(
        self,
        epoch: int,
        records: list,
        candidates: Candidates | None,
        selection: Selection | None,
        proposal_log_q: Callable[[], torch.Tensor],
    ) -> NegativeDraws | None:
        """The K negatives of every record for ``epoch`` (None for a source that draws none).

        ``proposal_log_q`` gives ``[R, M]`` log q_phi over the selected negatives when the source needs it.
        """
        source = get_source(self.source)
        if source.draw is None:
            return None

        # A pool source that pairs responses: a candidate that is one of the record's own edits carries its response.
        # Keyed by the resolved file, as mining keys a record's own images (one that is also a pool image keeps
        # the pool's path).
        own = ([{str(Path(p).resolve()): y for p, y in record_edits(r, self.records_file, self.image_root)} for r in records]
               if source.paired_responses and source.needs_pool else None)

        def refs(index: torch.Tensor) -> list[list[NegativeRef | None]]:
            # Candidate indices name the pool's images and then the records' own (mining.record_candidates).
            files = candidates.paths
            return [[NegativeRef(self.source, str(files[i]), i,
                                 response=None if own is None else own[r].get(str(Path(files[i]).resolve())))
                     if i >= 0 else None
                     for i in row.tolist()] for r, row in enumerate(index)]

        context = DrawContext(
            ids=[r.id for r in records], k=self.k, seed=self.seed, source=self.source,
            candidate_refs=lambda: refs(candidates.indices),
            candidate_valid=lambda: candidates.indices >= 0,
            selected_refs=lambda: refs(selection.pool_index),
            proposal_log_q=proposal_log_q,
            record_lists=lambda kind: self._record_lists(records, kind),
            target_strata=lambda: self._target_strata(records, candidates, selection),
        )
        return source.draw(context, epoch)

    def _target_strata(self, records: list, candidates: Candidates, selection: Selection) -> torch.Tensor:
        """``[R, M]`` bool: which selected negatives are the record's target edits (matched by resolved file)."""
        targets = [{str(Path(p).resolve()) for p in record_targets(r, self.records_file, self.image_root)}
                   for r in records]
        files = candidates.paths
        return torch.tensor([[i >= 0 and str(Path(files[i]).resolve()) in targets[r] for i in row.tolist()]
                             for r, row in enumerate(selection.pool_index)], dtype=torch.bool).reshape(selection.pool_index.shape)

    def _record_lists(self, records: list, kind: str) -> list[list[NegativeRef]]:
        """The image lists records carry; warns once when some hold fewer than K, since their draws then repeat."""
        if kind == EDITS:  # edited images with their own responses: the refs carry the response
            refs = [edit_refs(r, self.records_file, self.image_root) for r in records]
            self._warn_short(records, refs, kind)
            return refs
        lists = [record_images(r, kind, self.records_file, self.image_root) for r in records]
        self._warn_short(records, lists, kind)
        return [[NegativeRef(self.source, path) for path in x] for x in lists]

    def _warn_short(self, records: list, lists: list[list], kind: str) -> None:
        short = [r.id for r, x in zip(records, lists, strict=True) if 0 < len(x) < self.k]
        if short and not self._warned_short_lists:
            self._warned_short_lists = True
            log.warning(
                "source=%r: %d of %d records in %s have fewer than k=%d negatives (e.g. %s): their draws repeat "
                "negatives", self.source, len(short), len(lists), self.records_file, self.k, short[:3],
            )
