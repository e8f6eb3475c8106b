"""MMVP (Tong et al. 2024): 150 pairs of CLIP-blind images, one two-option question each.

Files, as released on the hub (MMVP/MMVP) and read by ``scripts/evaluate_mllm.py`` of tsb0601/MMVP:
``Questions.csv`` with columns ``Index``, ``Question``, ``Options`` ("(a) Open (b) Closed") and
``Correct Answer`` ("(a)"), and the images ``MMVP Images/<Index>.jpg``. Rows 1-2, 3-4, ... are the
pairs. misp reads them from ``<data_root>/mmvp/``. The prompt is ``Question + " " + Options``, as
``evaluate_mllm.py`` builds it.

Scoring: the answer's option is read with :func:`misp.eval.answers.read_option` (in place of the GPT
grader of ``gpt_grader.py``); a pair counts only when both its questions are right
(``mmvp/pair_accuracy``, the published number). An answer naming no option, or two, is unreadable
and wrong.
"""

from __future__ import annotations

import csv

from misp.data.records import RecordError, read_utf8
from misp.eval.answers import parse_options, read_option
from misp.eval.benchmark import (
    Benchmark,
    GroupAccuracyMetric,
    Question,
    check_images,
    require_file,
    warn_unreadable,
)

_COLUMNS = ("Index", "Question", "Options", "Correct Answer")


class MMVP(Benchmark):
    """MMVP's 300 questions in 150 image pairs, scored by pair accuracy."""

    name = "mmvp"
    max_new_tokens = 64

    def questions(self) -> list[Question]:
        path = require_file(self.root / "Questions.csv", "Questions.csv of MMVP")
        self.source = path
        reader = csv.DictReader(read_utf8(path).splitlines())
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise RecordError(path, 1, missing[0], f"missing column; MMVP's header is {', '.join(_COLUMNS)}")
        out = []
        for line, row in enumerate(reader, 2):
            index = (row["Index"] or "").strip()
            if not index.isdigit():
                raise RecordError(path, line, "Index", f"must be a positive integer, got {index!r}")
            options = parse_options(row["Options"] or "")
            if len(options) < 2:
                raise RecordError(path, line, "Options", f"needs at least two '(x) text' options, got {row['Options']!r}")
            correct = read_option(row["Correct Answer"] or "", options)
            if correct is None:
                raise RecordError(path, line, "Correct Answer", f"names none of the options: {row['Correct Answer']!r}")
            question = (row["Question"] or "").strip()
            if not question:
                raise RecordError(path, line, "Question", "empty")
            out.append(Question(index, self.root / "MMVP Images" / f"{index}.jpg", f"{question} {row['Options'].strip()}",
                                {"options": options, "truth": correct, "pair": (int(index) + 1) // 2}))
        out = self._limited(out)
        check_images(out, path)
        return out

    def judge(self, question: Question, answer: str) -> dict:
        pred = read_option(answer, question.meta["options"])
        if pred is None:
            warn_unreadable(self.source, question.id, answer, f"one of the options {question.meta['options']}")
        return {"truth": question.meta["truth"], "pred": pred, "correct": pred == question.meta["truth"],
                "pair": question.meta["pair"], "readable": pred is not None}

    def metric(self) -> GroupAccuracyMetric:
        return GroupAccuracyMetric("mmvp", "question_accuracy", {"pair_accuracy": "pair"})
