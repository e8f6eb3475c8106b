"""Pair precision against ground truth: how often CLIP's chosen response hallucinates less than its rejected one.

A hallucination is a mention of a vocabulary object that is not among the image's ground-truth objects
(CHAIR's count, method.md section 6: repeats count, found by the same ``MentionExtractor``). A pair is
correct when its chosen response has strictly fewer hallucinations than its rejected one; ties (often
both zero) and inversions are reported beside the precision, since a tie carries no hallucination
signal either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from misp.data.records import read_preference_records
from misp.eval.parsing import MentionExtractor
from misp.world.generate import read_manifest


def load_vocabulary(objects: str | os.PathLike | Sequence[str]) -> list[str]:
    """The object vocabulary: a list of names as given, or the ``objects`` of a Shapes world.

    Args:
        objects: names, or a world folder, or its ``world.json``.
    """
    if isinstance(objects, (str, os.PathLike)):
        path = Path(objects)
        manifest = path / "world.json" if path.is_dir() else path
        if not manifest.is_file():
            raise FileNotFoundError(
                f"object vocabulary {str(objects)!r}: no world folder or world.json there"
            )
        names = read_manifest(manifest).get("objects")
        if not isinstance(names, list) or not names:
            raise ValueError(f"{manifest} has no non-empty 'objects' list")
        return [str(n) for n in names]
    names = list(objects)
    if not names:
        raise ValueError("the object vocabulary is empty")
    return names


def count_hallucinations(text: str, truth: Iterable[str], extractor: MentionExtractor) -> int:
    """Mentions in ``text`` of vocabulary objects absent from ``truth`` (repeats count)."""
    present = {extractor.canonical.get(" ".join(o.lower().split()), o) for o in truth}
    return sum(m not in present for m in extractor(text))


@dataclass(frozen=True)
class PrecisionReport:
    """Pair precision over a set of pairs with ground truth."""

    pairs: int
    """Pairs measured."""
    correct: int
    """Pairs whose chosen response has fewer hallucinations than the rejected one."""
    ties: int
    """Pairs with equally many."""
    inverted: int
    """Pairs whose chosen response has more."""
    precision: float | None
    """``correct / pairs`` (None without pairs)."""
    chosen_hallucinations: float | None
    """Mean hallucinations per chosen response."""
    rejected_hallucinations: float | None
    """Mean hallucinations per rejected response."""

    def to_dict(self) -> dict:
        return asdict(self)


def pair_precision(
    pairs: Iterable[tuple[str, str, Sequence[str]]], vocabulary: Sequence[str]
) -> PrecisionReport:
    """Measure ``(chosen, rejected, ground-truth objects)`` triples against ``vocabulary``."""
    extractor = MentionExtractor(vocabulary)
    counts = [
        (count_hallucinations(c, truth, extractor), count_hallucinations(r, truth, extractor))
        for c, r, truth in pairs
    ]
    n = len(counts)
    return PrecisionReport(
        pairs=n,
        correct=sum(c < r for c, r in counts),
        ties=sum(c == r for c, r in counts),
        inverted=sum(c > r for c, r in counts),
        precision=sum(c < r for c, r in counts) / n if n else None,
        chosen_hallucinations=sum(c for c, _ in counts) / n if n else None,
        rejected_hallucinations=sum(r for _, r in counts) / n if n else None,
    )


def file_precision(
    path: str | os.PathLike, vocabulary: Sequence[str], objects_key: str = "objects"
) -> PrecisionReport:
    """Pair precision of a preference file whose records carry their ground truth in ``meta[objects_key]``
    (as ``misp prefs`` writes them, and as the Shapes world's pref.jsonl does)."""
    result = read_preference_records(path, verify_images=False)
    triples = []
    for r in result:
        truth = r.meta.get(objects_key)
        if not isinstance(truth, list):
            raise ValueError(
                f"{path}: record {r.id!r} has no list meta[{objects_key!r}] of ground-truth objects"
            )
        triples.append((r.chosen, r.rejected, truth))
    return pair_precision(triples, vocabulary)
