"""Where each record's negative images come from: a registry of ``NegativeSource``s, chosen by ``source``.

A source answers, for one epoch, "which K negatives does record r get, and with what proposal
log-probability": ``NegativeDraws``, each draw a ``misp.batch.NegativeRef``. Draws are a pure function
of (seed, epoch, record id), so a resumed run draws exactly what an uninterrupted one would, on every
rank. Each source also says what it needs (the mined pool, the SAE), what the log q of its draws means,
and how a seeded ref becomes an image. The datamodule and the method check ask the registry; the model
side never does (a ref says itself whether it names a file). A new source is one
``register_source(NegativeSource(...))``.

| source         | negatives                                                         | log q          |
| -------------- | ----------------------------------------------------------------- | -------------- |
| sae            | K of the record's M SAE-selected pool images, drawn from q_phi    | log q_phi      |
| random         | K of the record's N retrieved candidates, uniformly               | -log N         |
| counterfactual | K of the record's counterfactual renders (Shapes world), uniformly | -log (#renders) |
| given          | K of the record's ``negatives`` list, uniformly                   | -log (#given)  |
| crop           | K random resized crops of the positive (mDPO, 1%-20% of the area) | 0 (no proposal) |
| noise          | K forward-diffusion noisings of the positive at t (CHiP-style)    | 0 (no proposal) |
| occlude        | the positive with 1/K, 2/K, ..., K/K of an object hidden (LPOI), in that rank order | 0 (no proposal) |
| edits          | K of the record's edited images, each with its own response (``misp.negatives.edits``) | -log (#edits) |
| sae_pairs      | as ``sae``; a draw that is one of the record's edits (``mining.record_candidates: edits``) carries its response | log q_phi |
| sae_targets    | as ``sae_pairs``; the record's target edits (the partner's) are kept among the M and one is drawn every epoch | stratified log q_phi |
| none           | no negatives (plain DPO)                                          | -              |

With ``mining.record_candidates`` set (the mixed pool), the candidates of ``sae`` and ``random`` also hold
each record's own images (counterfactual renders or its ``negatives``) beside the retrieved pool images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from misp.batch import NegativeRef
from misp.negatives.occlusion import occlude
from misp.negatives.proposal import draw_negatives, gather_log_q, record_key
from misp.negatives.stratified import draw_stratified
from misp.negatives.transforms import diffusion_noise, random_resized_crop


@dataclass
class NegativeDraws:
    """One epoch's negatives for every record."""

    refs: list[list[NegativeRef]]
    """Per record, its K negatives: files (pool, given, counterfactual) or seeded transforms of the positive."""
    log_q: torch.Tensor
    """[R, K] proposal log-probability of each draw."""
    draw_index: torch.Tensor
    """[R, K] index of each draw in the record's candidate list (M for ``sae``)."""


def uniform_log_q(valid: torch.Tensor) -> torch.Tensor:
    """Uniform proposal rows over the valid entries of ``valid [R, M]`` (-inf elsewhere)."""
    counts = valid.sum(1, keepdim=True).clamp_min(1).to(torch.float64)
    return torch.where(valid, -counts.log(), torch.tensor(-math.inf, dtype=torch.float64))


def draw_from_lists(
    log_q: torch.Tensor, candidates: list[list[NegativeRef | None]], k: int, seed: int, epoch: int, ids: list[str]
) -> NegativeDraws:
    """Draw K entries per record from candidate lists (None: padding) with proposal rows ``log_q [R, M]``."""
    index = draw_negatives(log_q, k, seed, epoch, ids)
    refs = [[candidates[r][int(i)] for i in index[r]] for r in range(len(ids))]
    return NegativeDraws(refs, gather_log_q(log_q, index).float(), index)


def transform_draws(kind: str, k: int, seed: int, epoch: int, ids: list[str]) -> NegativeDraws:
    """K transformed copies of each positive; each copy's randomness seeded by (seed, epoch, id, k)."""
    refs = [
        [NegativeRef(kind, seed=record_key(f"{seed}:{epoch}:{rid}:{j}") & 0x7FFFFFFFFFFFFFFF) for j in range(k)]
        for rid in ids
    ]
    zeros = torch.zeros(len(ids), k)
    return NegativeDraws(refs, zeros, torch.arange(k).expand(len(ids), k).clone())


def ranked_draws(kind: str, k: int, seed: int, epoch: int, ids: list[str]) -> NegativeDraws:
    """A ranked list of K versions of each positive, all from one seed per (seed, epoch, id): version j of K."""
    refs = [
        [NegativeRef(kind, index=j, seed=record_key(f"{seed}:{epoch}:{rid}") & 0x7FFFFFFFFFFFFFFF, levels=k)
         for j in range(1, k + 1)]
        for rid in ids
    ]
    return NegativeDraws(refs, torch.zeros(len(ids), k), torch.arange(k).expand(len(ids), k).clone())


def padded_lists(lists: list[list[NegativeRef]]) -> tuple[list[list[NegativeRef | None]], torch.Tensor]:
    """Lists padded to one length (with None) and their validity mask ``[R, max_len]``."""
    width = max((len(x) for x in lists), default=0)
    valid = torch.tensor([[j < len(x) for j in range(width)] for x in lists], dtype=torch.bool).reshape(len(lists), width)
    return [list(x) + [None] * (width - len(x)) for x in lists], valid


@dataclass
class DrawContext:
    """What a source may read to draw an epoch's negatives (the datamodule fills it)."""

    ids: list[str]
    """The records' ids, in order."""
    k: int
    """Draws per record."""
    seed: int
    """Run seed; draws are a function of (seed, epoch, id)."""
    source: str = ""
    """The drawing source's name (what its refs carry)."""
    candidate_refs: Callable[[], list[list[NegativeRef | None]]] | None = None
    """Per record, the retrieved pool candidates (pool sources; None where a record has fewer)."""
    candidate_valid: Callable[[], torch.Tensor] | None = None
    """[R, N] validity of the retrieved candidates."""
    selected_refs: Callable[[], list[list[NegativeRef | None]]] | None = None
    """Per record, the M SAE-selected negatives (the sae source)."""
    proposal_log_q: Callable[[], torch.Tensor] | None = None
    """[R, M] log q_phi over the selected negatives (uniform without a learnable proposal)."""
    record_lists: Callable[[str], list[list[NegativeRef]]] | None = None
    """Per record, the image lists a record carries: ``record_lists("given")`` or ``("counterfactual")``."""
    target_strata: Callable[[], torch.Tensor] | None = None
    """[R, M] bool: which of the M selected negatives are the record's target edits (sources with ``targets``)."""


@dataclass(frozen=True)
class NegativeSource:
    """One way of finding negatives, as the rest of misp needs to know it."""

    name: str
    """The ``source`` value that selects it."""
    draw: Callable[[DrawContext, int], NegativeDraws] | None
    """(context, epoch) -> the epoch's draws; None for a source without negatives."""
    needs_pool: bool = False
    """Needs the mined candidate pool (CLIP embedding and retrieval over ``pool``)."""
    needs_sae: bool = False
    """Needs a trained SAE (``sae_path``) to select from the candidates."""
    proposal: Literal["none", "uniform", "learned"] = "uniform"
    """What a draw's log q is: a learned q_phi, a uniform choice over a list, or no distribution at all
    (transforms of the positive: importance sampling has nothing to correct)."""
    materialise: Callable[[NegativeRef, Path, Callable[[Path], Image.Image]], Image.Image] | None = None
    """(ref, positive path, loader) -> image, for the seeded refs a source makes from the positive (which
    are new images every epoch: neither the pixel cache nor the reference cache keeps them)."""
    ranked: bool = False
    """Its K draws of a record come in rank order, column k above column k + 1 (``occlude``)."""
    paired_responses: bool = False
    """Gives each negative image its own correct response (``TermInputs.paired``)."""
    edit_spans: bool = False
    """Gives the token spans each negative's edit changes in both responses (``TermInputs.spans``)."""
    in_context: bool = False
    """Gives the pairs in a two-image context (``TermInputs.in_context``)."""
    targets: bool = False
    """Keeps each record's target edits (``misp.negatives.edits.record_targets``: the partner's insertions and
    removals) among its M selected negatives and draws one of them every epoch (``misp.negatives.stratified``)."""

    @property
    def draws_negatives(self) -> bool:
        return self.draw is not None


REGISTRY: dict[str, NegativeSource] = {}
"""Every known source by name; ``register_source`` adds one."""


def register_source(source: NegativeSource) -> NegativeSource:
    """Make ``source`` selectable as ``data.source: <name>`` (a later registration of a name replaces it)."""
    REGISTRY[source.name] = source
    return source


def get_source(name: str) -> NegativeSource:
    if name not in REGISTRY:
        raise ValueError(f"unknown negative source {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def materialise(ref: NegativeRef, positive: Path, loader: Callable[[Path], Image.Image]) -> Image.Image:
    """The PIL image ``ref`` names: its file, or what its source makes of the positive image."""
    if ref.seed is not None:
        return get_source(ref.source).materialise(ref, positive, loader)
    return loader(Path(ref.path))


def _seeded_transform(transform) -> Callable:
    def apply(ref: NegativeRef, positive: Path, loader) -> Image.Image:
        generator = torch.Generator().manual_seed(ref.seed)
        return transform(loader(positive), generator)

    return apply


def _draw_transform(kind: str) -> Callable[[DrawContext, int], NegativeDraws]:
    return lambda c, epoch: transform_draws(kind, c.k, c.seed, epoch, c.ids)


def _draw_uniform_from(paths: Callable[[DrawContext], Sequence[list[NegativeRef]]], what: str):
    def draw(c: DrawContext, epoch: int) -> NegativeDraws:
        lists = [list(x) for x in paths(c)]
        empty = [rid for rid, x in zip(c.ids, lists, strict=True) if not x]
        if empty:
            raise ValueError(f"source {what!r}: records without negatives, e.g. {empty[:3]}")
        padded, valid = padded_lists(lists)
        return draw_from_lists(uniform_log_q(valid), padded, c.k, c.seed, epoch, c.ids)

    return draw


register_source(NegativeSource(
    "sae", lambda c, epoch: draw_from_lists(c.proposal_log_q(), c.selected_refs(), c.k, c.seed, epoch, c.ids),
    needs_pool=True, needs_sae=True, proposal="learned",
))
register_source(NegativeSource(
    "random",
    lambda c, epoch: draw_from_lists(uniform_log_q(c.candidate_valid()), c.candidate_refs(), c.k, c.seed, epoch, c.ids),
    needs_pool=True,
))
register_source(NegativeSource(
    "counterfactual", _draw_uniform_from(lambda c: c.record_lists("counterfactual"), "counterfactual"),
))
register_source(NegativeSource(
    "given", _draw_uniform_from(lambda c: c.record_lists("given"), "given"),
))
register_source(NegativeSource(
    "crop", _draw_transform("crop"), proposal="none",
    materialise=_seeded_transform(lambda image, g: random_resized_crop(image, g)[0]),
))
register_source(NegativeSource(
    "noise", _draw_transform("noise"), proposal="none",
    materialise=_seeded_transform(diffusion_noise),
))
register_source(NegativeSource(
    "occlude", lambda c, epoch: ranked_draws("occlude", c.k, c.seed, epoch, c.ids), proposal="none", ranked=True,
    materialise=lambda ref, positive, loader: occlude(
        loader(positive), torch.Generator().manual_seed(ref.seed), ref.index, ref.levels),
))
def _draw_edits(c: DrawContext, epoch: int) -> NegativeDraws:
    # A record without edits draws None: the datamodule has refused it (on_bad_record: raise) or left it out
    # (skip) with its file and line before any epoch is drawn (misp.data.pairs.check_edits).
    lists = [list(x) or [None] for x in c.record_lists("edits")]
    padded, valid = padded_lists(lists)
    return draw_from_lists(uniform_log_q(valid), padded, c.k, c.seed, epoch, c.ids)


# in_context: the data builds IC-VCO's two-image rows [m_p, m_k] when a term reads them (a family that takes
# several images per prompt; MISPDPOModule refuses them for one that does not).
register_source(NegativeSource("edits", _draw_edits, paired_responses=True, edit_spans=True, in_context=True))
# The mixed pool of misp_ground: retrieved images and the record's own edits, the SAE choosing, q_phi drawing.
# Only the draws that are edits have a response; the pair terms mask the others (ResponsePairRows.valid), and
# a retrieved draw's span is empty (its placeholder response is y_p itself).
register_source(NegativeSource(
    "sae_pairs", lambda c, epoch: draw_from_lists(c.proposal_log_q(), c.selected_refs(), c.k, c.seed, epoch, c.ids),
    needs_pool=True, needs_sae=True, proposal="learned", paired_responses=True, edit_spans=True,
))


def _draw_targets(c: DrawContext, epoch: int) -> NegativeDraws:
    log_q, candidates = c.proposal_log_q(), c.selected_refs()
    index, log_q_eff = draw_stratified(log_q, c.target_strata().to(log_q.device), c.k, c.seed, epoch, c.ids)
    refs = [[candidates[r][int(i)] for i in index[r]] for r in range(len(c.ids))]
    return NegativeDraws(refs, log_q_eff.float(), index)


# misp_ground's stratified variant: the partner's edits always among the M, one of them drawn every epoch, the
# importance weights those of the stratified design (misp.negatives.stratified), so L_img^IS stays unbiased.
register_source(NegativeSource(
    "sae_targets", _draw_targets, needs_pool=True, needs_sae=True, proposal="learned", paired_responses=True,
    edit_spans=True, targets=True,
))
register_source(NegativeSource("none", None, proposal="none"))
