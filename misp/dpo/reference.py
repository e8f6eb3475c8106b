"""The reference model of DPO, and a cache of its log-probs.

With LoRA the reference is the policy with its adapters disabled (no second copy in memory); without
LoRA it is a frozen copy made before training starts.

A negative drawn again in a later epoch, or the chosen/rejected pair of a record, has the same reference
log-prob every time, so ``ReferenceCache`` keeps them per (record id, response, image) and only the rows
it has not seen go through the reference forward. The image is ``"positive"`` or a ``misp.batch.NegativeRef``,
which says itself whether it names a file (cacheable) or a seeded transform of the positive, new each
epoch (not kept). The cache remembers the fingerprint of the reference
it was filled with and is cleared when the reference changes (another base model, another checkpoint).
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from misp.batch import NegativeRef


def uses_adapters(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextmanager
def reference_mode(policy: nn.Module, reference: nn.Module | None):
    """Yields the module that computes reference log-probs (adapters disabled, or the frozen copy)."""
    if reference is not None:
        with torch.no_grad():
            yield reference
        return
    ctx = policy.disable_adapter() if uses_adapters(policy) else nullcontext()
    was_training = policy.training
    policy.eval()  # no dropout in the reference pass
    try:
        with ctx, torch.no_grad():
            yield policy
    finally:
        policy.train(was_training)


@torch.no_grad()
def reference_fingerprint(policy: nn.Module, reference: nn.Module | None) -> str:
    """A cheap hash of the reference weights: per-tensor sums and shapes (adapter weights excluded)."""
    h = hashlib.sha256()
    module = reference if reference is not None else policy
    for name, tensor in module.state_dict().items():
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point() and tensor.numel():
            h.update(f"{float(tensor.float().sum()):.6e}".encode())
    return h.hexdigest()


class ReferenceCache:
    """Reference log-probs keyed by (record id, response, image); saved in checkpoints."""

    def __init__(self) -> None:
        self.fingerprint: str | None = None
        self.values: dict[tuple[str, str, NegativeRef | str], float] = {}
        self.hits = 0
        self.misses = 0

    def bind(self, fingerprint: str) -> None:
        """Use the cache for the reference with this fingerprint, dropping entries of any other."""
        if fingerprint != self.fingerprint:
            self.values.clear()
            self.fingerprint = fingerprint

    @staticmethod
    def cacheable(key: tuple[str, str, NegativeRef | str]) -> bool:
        # Seeded transforms of the positive are new images every epoch; files and the positive recur.
        image = key[2]
        return not isinstance(image, NegativeRef) or image.seed is None

    def lookup(self, keys: list[tuple[str, str, NegativeRef | str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached values (0 where missing) and the mask of rows that must be computed."""
        values = torch.zeros(len(keys), dtype=torch.float64)
        missing = torch.ones(len(keys), dtype=torch.bool)
        for i, key in enumerate(keys):
            if key in self.values:
                values[i] = self.values[key]
                missing[i] = False
        self.hits += int((~missing).sum())
        self.misses += int(missing.sum())
        return values, missing

    def store(self, keys: list[tuple[str, str, NegativeRef | str]], values: torch.Tensor) -> None:
        for key, value in zip(keys, values.tolist(), strict=True):
            if self.cacheable(key):
                self.values[key] = float(value)

    # A cached value as checkpoints hold it, and back (a subclass caching token rows keeps lists).
    _pack = staticmethod(float)
    _unpack = staticmethod(float)

    def state_dict(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            # Plain lists (a NegativeRef as its four fields), so checkpoints load with weights_only=True.
            "values": [[a, b, list(c) if isinstance(c, NegativeRef) else c, self._pack(v)]
                       for (a, b, c), v in self.values.items()],
            "hits": self.hits,
            "misses": self.misses,
        }

    def load_state_dict(self, state: dict) -> None:
        self.fingerprint = state.get("fingerprint")
        self.values = {
            (a, b, NegativeRef(*c) if isinstance(c, (list, tuple)) else c): self._unpack(v)
            for a, b, c, v in state.get("values", [])
        }
        self.hits, self.misses = int(state.get("hits", 0)), int(state.get("misses", 0))
