"""The COCO object vocabulary of CHAIR (Rohrbach et al. 2018) and its word matching.

``data/coco_synonyms.txt`` is ``data/synonyms.txt`` of LisaAnne/Hallucination (BSD-2-Clause, commit
6e4d33c), unchanged: one line per COCO category, its name first, then the words that count as it. It is
part of the metric: CHAIR numbers are comparable only when computed with this table. It ships inside
the package (pyproject's package-data), so an installed misp has it.

:meth:`CocoObjects.words` follows ``CHAIR.caption_to_words`` of ``utils/chair.py``: lower-case word
tokens, made singular, two-word names joined ("hot dog", "baby cat" -> cat, "passenger train" -> train,
"toilet seat" -> toilet, and "home plate" / "train track" so that they do not count as plate/train), a
"seat" dropped when "toilet" is there, and every remaining vocabulary word mapped to its category.
Singulars come from a rule (plural endings and irregular forms) instead of ``pattern.en.singularize``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

_WORD = re.compile(r"[a-z]+")
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "people", "feet": "foot",
              "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
              "wolves": "wolf", "skis": "ski", "buses": "bus", "glasses": "glass", "dishes": "dish",
              "sandwiches": "sandwich", "benches": "bench", "couches": "couch", "boxes": "box",
              "giraffes": "giraffe", "knifes": "knife", "oranges": "orange", "vases": "vase"}
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_EXTRA_DOUBLE = ("home plate", "train track")


@lru_cache(maxsize=1)
def coco_synonyms() -> tuple[tuple[str, ...], ...]:
    """The shipped table: one tuple per category, the category's name first."""
    text = resources.files("misp.eval").joinpath("data/coco_synonyms.txt").read_text(encoding="utf-8")
    return tuple(tuple(w.strip() for w in line.split(",") if w.strip()) for line in text.splitlines() if line.strip())


class CocoObjects:
    """CHAIR's word -> COCO category matching, built from :func:`coco_synonyms`."""

    def __init__(self) -> None:
        self.category: dict[str, str] = {}
        for line in coco_synonyms():
            for word in line:
                self.category[word] = line[0]
        self.categories: tuple[str, ...] = tuple(line[0] for line in coco_synonyms())
        double = {w: w for w in self.category if " " in w}
        double.update({w: w for w in _EXTRA_DOUBLE})
        for animal in _ANIMALS:
            double[f"baby {animal}"] = animal
            double[f"adult {animal}"] = animal
        for vehicle in ("jet", "train"):
            double[f"passenger {vehicle}"] = vehicle
        double.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        self.double = double
        self._known = set(self.category) | {w for d in double for w in d.split()}

    def singular(self, word: str) -> str:
        """``word`` made singular where its singular is a vocabulary word (or an irregular form)."""
        if word in self.category:
            return word
        if word in _IRREGULAR:
            return _IRREGULAR[word]
        for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
            if word.endswith(suffix) and word[: -len(suffix)] + repl in self._known:
                return word[: -len(suffix)] + repl
        return word

    def words(self, text: str) -> list[str]:
        """The COCO categories ``text`` names, one per mention, in order (CHAIR's ``node_words``)."""
        words = [self.singular(w) for w in _WORD.findall(text.lower())]
        joined, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if i + 1 < len(words) and pair in self.double:
                joined.append(self.double[pair])
                i += 2
            else:
                joined.append(words[i])
                i += 1
        if "toilet" in joined and "seat" in joined:
            joined = [w for w in joined if w != "seat"]
        return [self.category[w] for w in joined if w in self.category]
