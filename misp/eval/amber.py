"""AMBER (Wang et al. 2023): an LLM-free hallucination benchmark, generative and discriminative.

Files, as released in junyangwang0410/AMBER: ``data/annotations.json`` (per id: ``type`` and ``truth``;
for "generative" also ``hallu``), ``data/query/query_all.json`` (``id``, ``image``, ``query``; or one
of the other ``query_*.json`` files), ``data/relation.json`` (object -> associated words),
``data/safe_words.txt``, and the images (``AMBER_<n>.jpg``, from the release's image archive). misp
reads them from ``<data_root>/amber/`` with the images in ``<data_root>/amber/image/``.

Scoring follows ``inference.py``:

- generative (``amber/generative/...``): the response's nouns that are AMBER words (a key or value of
  relation.json) and not safe words; ``CHAIR`` = those outside the truth objects and their associated
  words / all of them; ``Cover`` = truth objects named (directly or by an associated word) / truth
  objects; ``Hal`` = responses with at least one such hallucinated noun / responses; ``Cog`` = the
  annotated hallucination-prone objects named / those objects. Two parts of ``inference.py`` need
  models that misp does not ship, and are replaced: nouns are found by word matching with a rule-based
  singular (``dogs`` -> ``dog``, ``men`` -> ``man``) instead of NLTK's tagger and WordNet lemmatiser,
  and the spaCy ``en_core_web_lg`` similarity > 0.8 fallback between words is left out (an exact match
  to an AMBER word is required). Numbers may therefore differ slightly from published ones.
- discriminative (``amber/{existence,attribute,relation}/...`` and pooled ``amber/discriminative/...``):
  answers read with :func:`misp.eval.answers.read_yes_no`; accuracy, and precision, recall and F1 with
  "no" the positive class, as ``inference.py`` computes them. An unreadable answer is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torchmetrics import Metric

from misp.data.records import RecordError, read_utf8
from misp.eval.answers import read_yes_no
from misp.eval.benchmark import (
    BINARY_COUNTS,
    Benchmark,
    Question,
    binary_outcome,
    binary_rates,
    check_images,
    ratio,
    require_file,
    warn_unreadable,
)

DIMENSIONS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
    "discriminative-relation": "relation",
    "relation": "relation",
}
"""AMBER's question types -> the dimension they are reported under (``inference.py``'s grouping)."""

_DIMENSION_ORDER = ("existence", "attribute", "relation")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
              "mice": "mouse", "geese": "goose", "people": "people", "leaves": "leaf", "knives": "knife",
              "shelves": "shelf", "wolves": "wolf", "loaves": "loaf", "glasses": "glass", "buses": "bus"}


def _singular(word: str, vocabulary: set[str]) -> str:
    """The form of ``word`` in ``vocabulary``: itself, an irregular singular, or without -s/-es/-ies."""
    if word in vocabulary:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + repl in vocabulary:
            return word[: -len(suffix)] + repl
    return word


def generative_counts(response: str, truth: list[str], hallu: list[str], association: dict[str, list[str]],
                      vocabulary: set[str], safe: set[str]) -> dict[str, int]:
    """``inference.py``'s generative counts for one response (without its spaCy similarity step).

    Returns:
        ``nouns`` (AMBER words found), ``hallucinated`` (of those, outside truth and its associations),
        ``truth`` / ``covered`` (truth objects / named), ``hallu`` / ``cognised`` (prone objects / named).
    """
    nouns = [w for w in (_singular(t, vocabulary) for t in _WORD.findall(response.lower())) if w in vocabulary]
    # The official index arithmetic: association words of each listed object first (pointing at it),
    # then the objects themselves; a noun marks the first entry it equals.
    def expand(objects: list[str]) -> list[tuple[str, int]]:
        words = [(w, i) for i, o in enumerate(objects) for w in association.get(o, [])]
        return words + [(o, i) for i, o in enumerate(objects)]

    safe_words, ha_words = expand(truth), expand(hallu)
    covered, cognised = [0] * len(truth), [0] * len(hallu)
    hallucinated = 0
    for noun in nouns:
        if noun in safe:
            continue
        hit = next((i for w, i in safe_words if w == noun), None)
        if hit is not None:
            covered[hit] = 1
            continue
        hit = next((i for w, i in ha_words if w == noun), None)
        if hit is not None:
            cognised[hit] = 1
        hallucinated += 1
    return {"nouns": len(nouns), "hallucinated": hallucinated, "truth": len(truth), "covered": sum(covered),
            "hallu": len(hallu), "cognised": sum(cognised)}


class AMBER(Benchmark):
    """AMBER's generative and discriminative questions (whichever the query file holds).

    Args:
        query_file: The query file under ``data/query/`` (``query_all.json``, ``query_generative.json``, ...).
    """

    name = "amber"
    max_new_tokens = 16
    description_tokens = 512
    """Longest answer to a generative ("Describe this image.") query."""

    def __init__(self, root: str | Path, limit: int | None = None, query_file: str = "query_all.json") -> None:
        super().__init__(root, limit)
        self.query_file = query_file

    def _json(self, relative: str, what: str):
        path = require_file(self.root / relative, what)
        try:
            return path, json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, None, f"not valid JSON: {e.msg}") from None

    def questions(self) -> list[Question]:
        qpath, queries = self._json(f"data/query/{self.query_file}", f"AMBER query file {self.query_file}")
        apath, annotations = self._json("data/annotations.json", "AMBER annotations.json")
        _, association = self._json("data/relation.json", "AMBER relation.json")
        safe_path = require_file(self.root / "data/safe_words.txt", "AMBER safe_words.txt")
        self.source = qpath
        self.association = {k: list(v) for k, v in association.items()}
        self.vocabulary = set(association) | {w for v in association.values() for w in v}
        self.safe = {line.strip() for line in read_utf8(safe_path).splitlines() if line.strip()}
        by_id = {}
        for i, a in enumerate(annotations, 1):
            if not isinstance(a, dict) or "id" not in a or "type" not in a or "truth" not in a:
                raise RecordError(apath, i, None, "an annotation needs id, type and truth")
            by_id[a["id"]] = a
        out = []
        for i, q in enumerate(queries, 1):
            for key in ("id", "image", "query"):
                if key not in q:
                    raise RecordError(qpath, i, key, "missing")
            a = by_id.get(q["id"])
            if a is None:
                raise RecordError(qpath, i, "id", f"{q['id']} has no entry in {apath}")
            image = self.root / "image" / str(q["image"])
            if a["type"] == "generative":
                meta = {"type": "generative", "truth": list(a["truth"]), "hallu": list(a.get("hallu", []))}
                out.append(Question(str(q["id"]), image, str(q["query"]), meta, self.description_tokens))
            elif a["type"] in DIMENSIONS:
                if a["truth"] not in ("yes", "no"):
                    raise RecordError(apath, q["id"], "truth", f"must be 'yes' or 'no', got {a['truth']!r}")
                meta = {"type": a["type"], "truth": a["truth"]}
                out.append(Question(str(q["id"]), image, str(q["query"]), meta))
            else:
                raise RecordError(apath, q["id"], "type", f"unknown AMBER type {a['type']!r}")
        out = self._limited(out)
        check_images(out, qpath)
        return out

    def judge(self, question: Question, answer: str) -> dict:
        meta = question.meta
        if meta["type"] == "generative":
            if not answer.strip():
                warn_unreadable(self.source, question.id, answer, "a description (it is empty)")
            counts = generative_counts(answer, meta["truth"], meta["hallu"], self.association, self.vocabulary,
                                       self.safe)
            return {"type": "generative", **counts, "readable": bool(answer.strip())}
        pred = read_yes_no(answer)
        if pred is None:
            warn_unreadable(self.source, question.id, answer, "yes or no")
        return {"type": meta["type"], "dimension": DIMENSIONS[meta["type"]], "truth": meta["truth"],
                "pred": pred, "readable": pred is not None}

    def metric(self) -> AMBERMetric:
        return AMBERMetric()


_GENERATIVE = ("responses", "hallucinated_responses", "nouns", "hallucinated", "truth", "covered", "hallu",
               "cognised", "empty")


class AMBERMetric(Metric):
    """AMBER's generative CHAIR, Cover, Hal and Cog, and discriminative accuracy/precision/recall/F1."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("generative", default=torch.zeros(len(_GENERATIVE), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("discriminative", default=torch.zeros(len(_DIMENSION_ORDER), len(BINARY_COUNTS),
                                                              dtype=torch.long), dist_reduce_fx="sum")

    def update(self, judgements: list[dict]) -> None:
        gen = torch.zeros_like(self.generative)
        disc = torch.zeros_like(self.discriminative)
        for j in judgements:
            if j["type"] == "generative":
                values = {"responses": 1, "hallucinated_responses": int(j["hallucinated"] > 0),
                          "empty": int(not j["readable"]), **{k: j[k] for k in _GENERATIVE[2:8]}}
                gen += torch.tensor([values[k] for k in _GENERATIVE])
            else:
                row = _DIMENSION_ORDER.index(DIMENSIONS[j["type"]])
                disc[row, binary_outcome(j["pred"], j["truth"], positive="no")] += 1
        self.generative += gen
        self.discriminative += disc

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        g = dict(zip(_GENERATIVE, self.generative.tolist(), strict=True))
        if g["responses"]:
            out.update({
                "amber/generative/CHAIR": ratio(g["hallucinated"], g["nouns"]),
                "amber/generative/Cover": ratio(g["covered"], g["truth"]),
                "amber/generative/Hal": ratio(g["hallucinated_responses"], g["responses"]),
                "amber/generative/Cog": ratio(g["cognised"], g["hallu"]),
                "amber/generative/responses": float(g["responses"]),
                "amber/generative/unreadable": float(g["empty"]),
            })
        rows = self.discriminative.tolist()
        for name, row in zip(_DIMENSION_ORDER, rows, strict=True):
            if sum(row):
                out.update(_disc(f"amber/{name}", row))
        total = [sum(c) for c in zip(*rows, strict=True)]
        if sum(total):
            out.update(_disc("amber/discriminative", total))
        return out


def _disc(prefix: str, counts: list[int]) -> dict[str, float]:
    rates = binary_rates(counts)
    keep = ("accuracy", "precision", "recall", "f1", "unreadable", "questions")
    return {f"{prefix}/{k}": rates[k] for k in keep}
