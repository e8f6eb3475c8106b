"""Turning free-form model answers into what the metrics count: yes/no decisions and object mentions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_SENTENCE_END = re.compile(r"[.!?\n]")
_NEGATION = re.compile(r"\b(?:no|not)\b", re.IGNORECASE)


def parse_yes_no(answer: str) -> str:
    """Read a POPE answer as "yes" or "no" (method.md section 6).

    The answer is "no" when its first sentence contains the whole word "no" or "not" (case-insensitive),
    else "yes". The first sentence runs from the first non-blank character to the first ``.``, ``!``,
    ``?`` or newline. So "No, there is not." and "not sure" are "no"; "Yes. No other objects." and
    "Nope" are "yes"; an empty answer is "yes" (it negates nothing). Contractions such as "isn't" are
    not negations under this rule, as in the POPE reference script.

    Args:
        answer: The model's raw answer.

    Returns:
        "yes" or "no".
    """
    first = _SENTENCE_END.split(answer.lstrip(), maxsplit=1)[0]
    return "no" if _NEGATION.search(first) else "yes"


class MentionExtractor:
    """Finds mentions of a fixed object vocabulary in text; compile once, call many times.

    Args:
        objects: Canonical object names, e.g. ``["dog", "hot dog", "red circle"]``.
        synonyms: Extra surface form -> canonical name (the canonical name must be in ``objects``).
    """

    def __init__(self, objects: Iterable[str], synonyms: Mapping[str, str] | None = None):
        canon: dict[str, str] = {}
        for name in objects:
            key = _normalise(name)
            if not key:
                raise ValueError("object names must be non-empty")
            canon[key] = key
        self.objects: tuple[str, ...] = tuple(canon)
        for form, target in (synonyms or {}).items():
            f, t = _normalise(form), _normalise(target)
            if t not in self.objects:
                raise ValueError(
                    f"synonym {form!r} maps to {target!r}, which is not in the object vocabulary"
                )
            if not f:
                raise ValueError(f"empty synonym for {target!r}")
            if canon.get(f, t) != t:
                raise ValueError(f"{form!r} maps to both {canon[f]!r} and {target!r}")
            canon[f] = t
        self.canonical: dict[str, str] = canon
        # Longest surface forms first: regex alternation takes the first alternative that matches at a
        # position, so "hot dog" wins over "dog" and consumes it.
        forms = sorted(canon, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(re.escape(w) for w in f.split()) for f in forms)
        # (?<!\w)/(?!\w) rather than \b so forms that start or end with punctuation still match; the
        # optional "s"/"es" accepts regular plurals of the last word.
        self._pattern = re.compile(rf"(?<!\w)({alternatives})(?:e?s)?(?!\w)", re.IGNORECASE)

    def canonicalise(self, name: str) -> str:
        """The canonical name of an object name or synonym; ValueError if it is not in the vocabulary."""
        key = _normalise(name)
        if key not in self.canonical:
            raise ValueError(f"{name!r} is not in the object vocabulary or its synonyms")
        return self.canonical[key]

    def __call__(self, text: str) -> list[str]:
        """Canonical names of every mention in ``text``, in order of appearance (repeats kept)."""
        return [self.canonical[_normalise(m.group(1))] for m in self._pattern.finditer(text)]


def _normalise(name: str) -> str:
    return " ".join(name.lower().split())


def extract_mentions(text: str, objects: list[str], synonyms: dict[str, str] | None = None) -> list[str]:
    """Every mention of a vocabulary object in ``text``, as canonical names in order of appearance.

    Matching is case-insensitive on whole words, prefers the longest vocabulary entry at each position
    (multi-word names such as "hot dog" or "red circle" are one mention), accepts any whitespace between
    the words of a name and a plural "s"/"es" on its last word, and is indifferent to spacing around
    punctuation ("a dog ." or "a dog."). Synonyms are mapped to their canonical object. Repeated
    mentions are all returned. For many texts build one :class:`MentionExtractor` instead.

    Args:
        text: The response to scan.
        objects: Canonical object names.
        synonyms: Surface form -> canonical name.

    Returns:
        Canonical names, one per mention.
    """
    return MentionExtractor(objects, synonyms)(text)
