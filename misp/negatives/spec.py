"""The negatives a method draws (source and K): a part of ``misp.dpo.method.Method``, the one home of K.

Here, not beside ``Method``, because the data room reads it too (the module hands it over in
``attach``) and must not import the training room.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Negatives:
    """The negative images a method draws for each record."""

    source: str = "none"
    """Where negatives come from, a name in ``misp.negatives.sources.REGISTRY``: sae, random, counterfactual,
    given, crop, noise or none (or one registered by the user)."""
    k: int = 0
    """Negatives drawn per record per epoch (>= 1 for a source that draws; 0 for ``none``)."""

    @property
    def drawn(self) -> int:
        """K as drawn: ``k`` for a source that draws negatives, else 0 (a batch has exactly this many columns)."""
        from misp.negatives.sources import get_source

        return self.k if get_source(self.source).draws_negatives else 0
