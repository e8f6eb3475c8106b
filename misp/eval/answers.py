"""Reading benchmark answers as the official scripts do, with "unreadable" kept apart from "no".

Two readers, one per answer style the benchmarks ask for:

- :func:`read_yes_no`: a yes/no question (HallusionBench, AMBER's discriminative half). The answer's
  words are looked at as VLMEvalKit's ``YOrN_Extraction`` does for HallusionBench: "yes" without "no"
  is yes, "no" (or "not") without "yes" is no; anything else (empty, both, neither) is unreadable.
- :func:`read_option`: a multiple-choice question (MMVP): the letter of the option the answer names,
  "(a)", "A.", "The answer is (B)", "b) Closed", or the option's text alone ("Closed").

An unreadable answer is None, never "no": the metrics count it separately and score it wrong.
POPE keeps its own reference rule (:func:`misp.eval.parsing.parse_yes_no`) with only an empty answer
unreadable (:func:`read_pope`), since the published POPE numbers were computed with that rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from misp.eval.parsing import parse_yes_no

_WORD = re.compile(r"[a-z]+")
_NEGATIONS = frozenset({"no", "not"})

_OPTION = re.compile(r"\(([a-z])\)\s*([^()]*?)\s*(?=\([a-z]\)|$)", re.IGNORECASE)
"""An option in MMVP's ``Options`` column: ``(a) Open (b) Closed``."""


def read_yes_no(answer: str) -> str | None:
    """"yes", "no" or None (unreadable) for a free-form answer to a yes/no question.

    The words of the answer are compared case-insensitively: "yes" and no negation ("no", "not") reads
    as yes; a negation and no "yes" reads as no; an empty answer, one with both ("Yes and no") and one
    with neither ("It is hard to tell") read as None. "Yes, there is a dog." is yes; "No, there is
    not." is no; "There is no dog." is no.
    """
    words = set(_WORD.findall(answer.lower()))
    yes, no = "yes" in words, bool(words & _NEGATIONS)
    if yes and not no:
        return "yes"
    if no and not yes:
        return "no"
    return None


def read_pope(answer: str) -> str | None:
    """POPE's reference rule (a negation in the first sentence is "no", else "yes"); None if empty."""
    return parse_yes_no(answer) if answer.strip() else None


def parse_options(text: str) -> dict[str, str]:
    """MMVP's ``Options`` cell as ``{"a": "Open", "b": "Closed"}``; {} when it holds no ``(x)`` option."""
    return {m.group(1).lower(): m.group(2).strip().rstrip(".;,").strip() for m in _OPTION.finditer(text)}


_LETTER_PATTERNS = (
    re.compile(r"\(([a-z])\)", re.IGNORECASE),  # "(b)", "The answer is (B)."
    re.compile(r"(?:answer|option)\s*(?:is|:)?\s*([a-z])\b", re.IGNORECASE),  # "answer: b", "Option B"
    re.compile(r"^\s*([a-z])\s*(?:[).:]|$)", re.IGNORECASE),  # "b", "B.", "a) Open", "b: closed"
)


def read_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter (lower case) of the option ``answer`` chooses, or None when it names none or several.

    A letter written as an option marker counts first ("(b)", "answer is B", "B." at the start); failing
    that, the answer counts when it contains the text of exactly one option as whole words ("Closed"),
    a longer option text winning over one it contains.

    Args:
        answer: The model's raw answer.
        options: letter -> option text, e.g. from :func:`parse_options`.
    """
    letters = {k.lower() for k in options}
    for pattern in _LETTER_PATTERNS:
        found = {m.lower() for m in pattern.findall(answer)} & letters
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    text = " ".join(_WORD.findall(answer.lower()))
    hits = []
    for letter, option in options.items():
        words = " ".join(_WORD.findall(option.lower()))
        if words and re.search(rf"(?<![a-z]){re.escape(words)}(?![a-z])", text):
            hits.append((letter.lower(), words))
    # "red and white" contains "red": keep only options not inside another option that also matched.
    hits = [h for h in hits if not any(h[1] != o and h[1] in o for _, o in hits)]
    return hits[0][0] if len(hits) == 1 else None
