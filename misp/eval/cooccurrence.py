"""Co-occurrence hallucination: how often a description names the usual partner of an object it sees.

CHAIR says how much a model hallucinates; this metric says how much of it comes from a known language
prior. Given pairs ``trigger -> partner`` (in the Shapes world the biases of its sft split; for real data
pairs such as "dining table -> fork"), every description of an image that holds a trigger but not its
partner is a chance to hallucinate that partner. The rate at which it does is compared with the rate at
which the same descriptions name any other absent object, so a prior shows up as a ratio well above 1.
Beside it stands the rate at which descriptions name the partner when it IS in the image: a model that
learned to look names it when present and not when absent; one that learned to suppress the word does
neither, and only the two rates together tell these apart.

Integer counts reduced by sum, like :mod:`misp.eval.metrics`, so results aggregate exactly across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torchmetrics import Metric

from misp.eval.parsing import MentionExtractor


def parse_pairs(pairs: Iterable[str]) -> list[tuple[str, str]]:
    """``["TRIGGER -> PARTNER", ...]`` as (trigger, partner) tuples; ValueError names a malformed entry."""
    out = []
    for text in pairs:
        sides = [" ".join(s.split()) for s in str(text).split("->")]
        if len(sides) != 2 or not all(sides):
            raise ValueError(f"co-occurrence pair {text!r} must read 'TRIGGER -> PARTNER'")
        out.append((sides[0], sides[1]))
    return out


_COUNTS = (
    "cases",
    "partner_named",
    "other_cases",
    "other_named",
    "hallucinated",
    "partner_hallucinated",
    "present_cases",
    "present_named",
)
"""The metric's states: integer counts, summed across batches and ranks."""


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


class CooccurrenceMetric(Metric):
    """Rates at which descriptions name a missing partner, against other absent objects.

    - ``cooccurrence/partner_rate``: (description, missing partner) cases in which the description names
      the partner / all such cases. A case is an image holding a trigger but not its partner.
    - ``cooccurrence/other_rate``: the same descriptions' mentions of any other absent object / the
      (description, other absent object) cases, i.e. the background hallucination rate per object.
    - ``cooccurrence/partner_share``: hallucinated mentions that are missing partners / all hallucinated
      mentions: the part of CHAIR_i's numerator that the prior explains.
    - ``cooccurrence/cases``: the number of (description, missing partner) cases seen.
    - ``cooccurrence/partner_present_rate``: (description, present partner) cases in which the
      description names the partner / all such cases. A case is an image holding a trigger AND its
      partner; the higher the better, unlike ``partner_rate``.
    - ``cooccurrence/present_cases``: the number of (description, present partner) cases seen.

    Args:
        pairs: ``"TRIGGER -> PARTNER"`` strings; every name must be in ``objects``.
        objects: The object vocabulary (as for CHAIR).
        synonyms: Surface form -> canonical name.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self, pairs: Iterable[str], objects: Iterable[str], synonyms: Mapping[str, str] | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.extractor = MentionExtractor(objects, synonyms)
        try:
            self.pairs = [tuple(map(self.extractor.canonicalise, p)) for p in parse_pairs(pairs)]
        except ValueError as e:
            raise ValueError(f"co-occurrence pairs: {e}") from None
        if not self.pairs:
            raise ValueError("CooccurrenceMetric needs at least one 'TRIGGER -> PARTNER' pair")
        for name in _COUNTS:
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, responses: Sequence[str], gt_objects: Sequence[Sequence[str]], present_only: bool = False
    ) -> None:
        """Count one batch of descriptions against their images' ground-truth objects.

        ``present_only`` counts the present-partner cases alone: for scenes chosen because they hold a
        pair (a world's partner scenes), which would skew every other rate (docs/world.md).
        """
        if len(responses) != len(gt_objects):
            raise ValueError(f"{len(responses)} responses but {len(gt_objects)} ground-truth object lists")
        c = dict.fromkeys(_COUNTS, 0)
        vocabulary = set(self.extractor.objects)
        for text, gt in zip(responses, gt_objects, strict=True):
            truth = {self.extractor.canonicalise(o) for o in gt}
            mentioned = self.extractor(text)
            missing = {p for t, p in self.pairs if t in truth and p not in truth}
            present = {p for t, p in self.pairs if t in truth and p in truth}
            hallucinated = [m for m in mentioned if m not in truth]
            c["present_cases"] += len(present)
            c["present_named"] += len(present & set(mentioned))
            if present_only:
                continue
            c["hallucinated"] += len(hallucinated)
            c["partner_hallucinated"] += sum(m in missing for m in hallucinated)
            if missing:
                named = set(mentioned)
                others = vocabulary - truth - missing
                c["cases"] += len(missing)
                c["partner_named"] += len(missing & named)
                c["other_cases"] += len(others)
                c["other_named"] += len(others & named)
        for name, value in c.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, float]:
        """The four rates and the two case counts; 0/0 rates are 0.0."""
        return {
            "cooccurrence/partner_rate": _ratio(self.partner_named.item(), self.cases.item()),
            "cooccurrence/other_rate": _ratio(self.other_named.item(), self.other_cases.item()),
            "cooccurrence/partner_share": _ratio(self.partner_hallucinated.item(), self.hallucinated.item()),
            "cooccurrence/cases": float(self.cases.item()),
            "cooccurrence/partner_present_rate": _ratio(self.present_named.item(), self.present_cases.item()),
            "cooccurrence/present_cases": float(self.present_cases.item()),
        }
