"""Where each record's negative images come from: a registry of ``NegativeSource``s, chosen by ``source``.

A source answers, for one epoch, "which K negatives does record r get, and with what proposal
log-probability": ``NegativeDraws``. Draws are a pure function of (seed, epoch, record id), so a resumed
run draws exactly what an uninterrupted one would, on every rank. Each source also says what it needs
(the mined pool, the SAE), what the log q of its draws means, whether the reference may cache its images'
log-probs, and how a drawn spec becomes an image. The datamodule, the method check and the reference
cache ask the registry; a new source is one ``register_source(NegativeSource(...))``.

| source         | negatives                                                         | log q          |
| -------------- | ----------------------------------------------------------------- | -------------- |
| sae            | K of the record's M SAE-selected pool images, drawn from q_phi    | log q_phi      |
| random         | K of the record's N retrieved candidates, uniformly               | -log N         |
| counterfactual | K of the record's counterfactual renders (Shapes world), uniformly | -log (#renders) |
| given          | K of the record's ``negatives`` list, uniformly                   | -log (#given)  |
| crop           | K random resized crops of the positive (mDPO, 1%-20% of the area) | 0 (no proposal) |
| noise          | K forward-diffusion noisings of the positive at t (CHiP-style)    | 0 (no proposal) |
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

from misp.negatives.proposal import draw_negatives, gather_log_q, record_key
from misp.negatives.transforms import diffusion_noise, random_resized_crop


@dataclass
class NegativeDraws:
    """One epoch's negatives for every record."""

    specs: list[list[str]]
    """Per record, K image specs: a file path, or ``crop:<seed>`` / ``noise:<seed>`` of the positive."""
    log_q: torch.Tensor
    """[R, K] proposal log-probability of each draw."""
    draw_index: torch.Tensor
    """[R, K] index of each draw in the record's candidate list (M for ``sae``)."""


def uniform_log_q(valid: torch.Tensor) -> torch.Tensor:
    """Uniform proposal rows over the valid entries of ``valid [R, M]`` (-inf elsewhere)."""
    counts = valid.sum(1, keepdim=True).clamp_min(1).to(torch.float64)
    return torch.where(valid, -counts.log(), torch.tensor(-math.inf, dtype=torch.float64))


def draw_from_lists(
    log_q: torch.Tensor, paths: list[list[str]], k: int, seed: int, epoch: int, ids: list[str]
) -> NegativeDraws:
    """Draw K entries per record from candidate lists ``paths`` with proposal rows ``log_q [R, M]``."""
    index = draw_negatives(log_q, k, seed, epoch, ids)
    specs = [[paths[r][int(i)] for i in index[r]] for r in range(len(ids))]
    return NegativeDraws(specs, gather_log_q(log_q, index).float(), index)


def transform_draws(kind: str, k: int, seed: int, epoch: int, ids: list[str]) -> NegativeDraws:
    """K transformed copies of each positive; each copy's randomness seeded by (seed, epoch, id, k)."""
    specs = [[f"{kind}:{(record_key(f'{seed}:{epoch}:{rid}:{j}')) & 0x7FFFFFFFFFFFFFFF}" for j in range(k)] for rid in ids]
    zeros = torch.zeros(len(ids), k)
    return NegativeDraws(specs, zeros, torch.arange(k).expand(len(ids), k).clone())


def padded_lists(lists: list[list[str]]) -> tuple[list[list[str]], torch.Tensor]:
    """Lists padded to one length (with ``""``) and their validity mask ``[R, max_len]``."""
    width = max((len(x) for x in lists), default=0)
    valid = torch.tensor([[j < len(x) for j in range(width)] for x in lists], dtype=torch.bool).reshape(len(lists), width)
    return [list(x) + [""] * (width - len(x)) for x in lists], valid


@dataclass
class DrawContext:
    """What a source may read to draw an epoch's negatives (the datamodule fills it)."""

    ids: list[str]
    """The records' ids, in order."""
    k: int
    """Draws per record."""
    seed: int
    """Run seed; draws are a function of (seed, epoch, id)."""
    candidate_paths: Callable[[], list[list[str]]] | None = None
    """Per record, the retrieved pool candidates' paths (pool sources)."""
    candidate_valid: Callable[[], torch.Tensor] | None = None
    """[R, N] validity of the retrieved candidates."""
    selected_paths: Callable[[], list[list[str]]] | None = None
    """Per record, the M SAE-selected negatives' paths (the sae source)."""
    proposal_log_q: Callable[[], torch.Tensor] | None = None
    """[R, M] log q_phi over the selected negatives (uniform without a learnable proposal)."""
    record_lists: Callable[[str], list[list[str]]] | None = None
    """Per record, the image lists a record carries: ``record_lists("given")`` or ``("counterfactual")``."""


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
    reference_cacheable: bool = True
    """The same image recurs across epochs, so the reference may cache its log-probs."""
    materialise: Callable[[str, Path, Callable[[Path], Image.Image]], Image.Image] | None = None
    """(spec, positive path, loader) -> image, for specs that are not file paths (``<name>:<seed>``)."""
    description: str = ""
    """One line for docs and errors."""

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


def _spec_source(spec: str) -> NegativeSource | None:
    kind, sep, _ = spec.partition(":")
    source = REGISTRY.get(kind) if sep else None
    return source if source is not None and source.materialise is not None else None


def reference_cacheable(spec: str) -> bool:
    """Whether the reference log-prob of a row with this image spec may be reused in a later epoch."""
    source = _spec_source(spec)
    return source.reference_cacheable if source is not None else True  # a file path: the same image again


def names_file(spec: str) -> bool:
    """Whether ``spec`` is an image file's path, not ``<source>:<seed>`` that a source makes from the positive.

    Only a file may be cached by its name (``misp.data.pixel_cache``): a materialised spec is made in
    memory from the record's positive, and a user's source may give the same spec to different records.
    """
    return _spec_source(spec) is None


def materialise(spec: str, positive: Path, loader) -> Image.Image:
    """The PIL image a spec names: a file, or what its source makes of the positive image."""
    source = _spec_source(spec)
    if source is not None:
        return source.materialise(spec, positive, loader)
    return loader(Path(spec))


def _seeded_transform(transform) -> Callable:
    def apply(spec: str, positive: Path, loader) -> Image.Image:
        generator = torch.Generator().manual_seed(int(spec.partition(":")[2]))
        return transform(loader(positive), generator)

    return apply


def _draw_transform(kind: str) -> Callable[[DrawContext, int], NegativeDraws]:
    return lambda c, epoch: transform_draws(kind, c.k, c.seed, epoch, c.ids)


def _draw_uniform_from(paths: Callable[[DrawContext], Sequence[list[str]]], what: str):
    def draw(c: DrawContext, epoch: int) -> NegativeDraws:
        lists = [list(x) for x in paths(c)]
        empty = [rid for rid, x in zip(c.ids, lists, strict=True) if not x]
        if empty:
            raise ValueError(f"source {what!r}: records without negatives, e.g. {empty[:3]}")
        padded, valid = padded_lists(lists)
        return draw_from_lists(uniform_log_q(valid), padded, c.k, c.seed, epoch, c.ids)

    return draw


register_source(NegativeSource(
    "sae", lambda c, epoch: draw_from_lists(c.proposal_log_q(), c.selected_paths(), c.k, c.seed, epoch, c.ids),
    needs_pool=True, needs_sae=True, proposal="learned",
    description="K of the record's M SAE-selected pool images, drawn from q_phi (MISP-DPO)",
))
register_source(NegativeSource(
    "random",
    lambda c, epoch: draw_from_lists(uniform_log_q(c.candidate_valid()), c.candidate_paths(), c.k, c.seed, epoch, c.ids),
    needs_pool=True, description="K of the record's N retrieved candidates, uniformly (random multi-negative)",
))
register_source(NegativeSource(
    "counterfactual", _draw_uniform_from(lambda c: c.record_lists("counterfactual"), "counterfactual"),
    description="K of the record's one-attribute counterfactual renders (Shapes world)",
))
register_source(NegativeSource(
    "given", _draw_uniform_from(lambda c: c.record_lists("given"), "given"),
    description="K of the record's own `negatives` list",
))
register_source(NegativeSource(
    "crop", _draw_transform("crop"), proposal="none", reference_cacheable=False,
    materialise=_seeded_transform(lambda image, g: random_resized_crop(image, g)[0]),
    description="K random resized crops of the positive keeping 1%-20% of its area (mDPO)",
))
register_source(NegativeSource(
    "noise", _draw_transform("noise"), proposal="none", reference_cacheable=False,
    materialise=_seeded_transform(diffusion_noise),
    description="K forward-diffusion noisings of the positive (CHiP-style)",
))
register_source(NegativeSource("none", None, proposal="none", description="no negatives (plain DPO)"))
