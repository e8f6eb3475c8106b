"""A shuffling sampler whose order is a pure function of (seed, epoch).

A ``DataLoader(shuffle=True, generator=g)`` advances ``g`` every time an iterator is made, and Lightning
makes extra ones (sanity checks, resumption), so the order of an epoch would depend on the run's
history. This sampler recomputes its permutation from (seed, epoch) on every ``__iter__``: a resumed run
sees exactly the batches of an uninterrupted one. Under DDP Lightning wraps it in a distributed sampler.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, epoch: int) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
