"""A shuffling sampler whose order is a pure function of (seed, epoch).

A ``DataLoader(shuffle=True, generator=g)`` advances ``g`` every time an iterator is made, and Lightning
makes extra ones (sanity checks, resumption), so the order of an epoch would depend on the run's
history. This sampler recomputes its permutation from (seed, epoch) on every ``__iter__``: a resumed run
sees exactly the batches of an uninterrupted one. Under DDP Lightning wraps it in a distributed sampler.

Resuming mid-epoch. :class:`ResumableDataLoader` tells Lightning the loader can resume inside an epoch
(the ``state_dict`` / ``load_state_dict`` protocol, which silences its "not resumable" warning). The
position itself is checkpointed by the datamodule (the batches its epoch had done when the checkpoint
was written), which passes ``skip`` to the sampler; the sampler then starts after those samples, so the
skipped batches are not even loaded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """The permutation of ``range(size)`` for ``(seed, epoch)``; the first iteration starts at ``skip``.

    ``__len__`` stays ``size`` so that Lightning's count of the epoch's batches matches an uninterrupted
    run; its progress counters already hold the skipped ones.
    """

    def __init__(self, size: int, seed: int, epoch: int, skip: int = 0) -> None:
        self.size, self.seed, self.epoch, self.skip = size, seed, epoch, skip

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        skip, self.skip = self.skip, 0  # only the resumed pass skips
        return iter(torch.randperm(self.size, generator=generator).tolist()[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning may resume mid-epoch (see the module docstring)."""

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"seed": getattr(sampler, "seed", None), "epoch": getattr(sampler, "epoch", None)}

    def load_state_dict(self, state: dict) -> None:
        # The position is restored by the datamodule, which builds the sampler; nothing to restore here.
        pass
