"""Where each record's negative images come from, behind one interface (selected by ``source`` in config).

A source answers, for one epoch, "which K negatives does record r get, and with what proposal
log-probability": ``NegativeDraws``. Draws are a pure function of (seed, epoch, record id), so a resumed
run draws exactly what an uninterrupted one would, on every rank.

| source         | negatives                                                         | log q          |
| -------------- | ----------------------------------------------------------------- | -------------- |
| sae            | K of the record's M SAE-selected pool images, drawn from q_phi    | log q_phi      |
| random         | K of the record's N retrieved candidates, uniformly               | -log N         |
| counterfactual | K of the record's counterfactual renders (Shapes world), uniformly | -log (#renders) |
| given          | K of the record's ``negatives`` list, uniformly                   | -log (#given)  |
| crop           | K random resized crops of the positive (mDPO, 1%-20% of the area) | 0              |
| noise          | K forward-diffusion noisings of the positive at t (CHiP-style)    | 0              |
| none           | no negatives (plain DPO)                                          | -              |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from misp.negatives.proposal import draw_negatives, gather_log_q, record_key
from misp.negatives.transforms import diffusion_noise, random_resized_crop

SOURCES = ("sae", "random", "counterfactual", "given", "crop", "noise", "none")
FROM_POOL = ("sae", "random")
TRANSFORMS = ("crop", "noise")


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


def materialise(spec: str, positive: Path, loader) -> Image.Image:
    """The PIL image a spec names: a file, or a seeded transform of the positive image."""
    kind, _, seed = spec.partition(":")
    if kind in TRANSFORMS and seed.isdigit():
        generator = torch.Generator().manual_seed(int(seed))
        image = loader(positive)
        if kind == "crop":
            return random_resized_crop(image, generator)[0]
        return diffusion_noise(image, generator)
    return loader(Path(spec))
