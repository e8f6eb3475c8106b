"""HallusionBench (Guan et al. 2024): yes/no questions on original and edited figures.

Files, as released in tianyi-lab/HallusionBench: ``HallusionBench.json`` (a JSON array of records with
``category`` VD/VS, ``subcategory``, ``set_id``, ``figure_id``, ``question_id``, ``visual_input``,
``question``, ``gt_answer`` "1" (yes) / "0" (no), ``filename``) and the images of ``hallusion_bench.zip``
unpacked beside it, ``hallusion_bench/<category>/<subcategory>/<set_id>_<figure_id>.png`` (the record's ``filename``,
``./VS/chart/0_1.png``, is relative to ``hallusion_bench/``). misp reads both from
``<data_root>/hallusionbench/``. Questions without a figure (``visual_input`` "0") are text-only and are
left out, as the image split of lmms-eval and VLMEvalKit does.

Scoring: an answer is read with :func:`misp.eval.answers.read_yes_no` (VLMEvalKit's yes/no matching
for this benchmark, in place of the GPT-4 judge of ``evaluation.py``) and is correct when it equals the
ground truth; an unreadable answer is "uncertain" (the official correctness "2"), which is wrong.
- ``aAcc``: correct questions / questions;
- ``fAcc``: figures (``category_subcategory_set_id_figure_id``) whose questions are all correct / figures;
- ``qAcc``: question pairs (``category_subcategory_set_id_question_id``, the same question over the
  figures of a set) all correct / question pairs, as ``get_eval_pair_all``.
"""

from __future__ import annotations

from misp.data.records import RecordError
from misp.eval.answers import read_yes_no
from misp.eval.benchmark import (
    Benchmark,
    GroupAccuracyMetric,
    Question,
    check_images,
    read_json_array,
    require_file,
    warn_unreadable,
)

PROMPT_SUFFIX = " Please answer yes or no."
"""Appended to each question, as VLMEvalKit's yes/no benchmarks do (the questions carry no instruction)."""

_FIELDS = ("category", "subcategory", "set_id", "figure_id", "question_id", "visual_input", "question", "gt_answer")


class HallusionBench(Benchmark):
    """HallusionBench's figure questions, scored by aAcc, fAcc and qAcc."""

    name = "hallusionbench"
    max_new_tokens = 64

    def questions(self) -> list[Question]:
        path = require_file(self.root / "HallusionBench.json", "HallusionBench.json of tianyi-lab/HallusionBench")
        self.source = path
        rows = read_json_array(path)
        out = []
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise RecordError(path, i, None, "a question record must be a JSON object")
            for key in _FIELDS:
                if row.get(key) is None:
                    raise RecordError(path, i, key, "missing")
            if str(row["visual_input"]) == "0":
                continue
            truth = {"1": "yes", "0": "no"}.get(str(row["gt_answer"]))
            if truth is None:
                raise RecordError(path, i, "gt_answer", f"must be '1' (yes) or '0' (no), got {row['gt_answer']!r}")
            c, s, st, f, q = (str(row[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
            # ``filename`` ("./VS/chart/0_1.png") is relative to the unpacked hallusion_bench/ folder.
            name = row.get("filename") or f"{c}/{s}/{st}_{f}.png"
            image = self.root / "hallusion_bench" / str(name)
            out.append(Question(
                f"{c}_{s}_{st}_{f}_{q}", image, str(row["question"]) + PROMPT_SUFFIX,
                {"truth": truth, "figure": f"{c}_{s}_{st}_{f}", "pair": f"{c}_{s}_{st}_{q}"},
            ))
        out = self._limited(out)
        check_images(out, path)
        return out

    def judge(self, question: Question, answer: str) -> dict:
        pred = read_yes_no(answer)
        if pred is None:
            warn_unreadable(self.source, question.id, answer, "yes or no")
        return {"truth": question.meta["truth"], "pred": pred, "correct": pred == question.meta["truth"],
                "figure": question.meta["figure"], "pair": question.meta["pair"], "readable": pred is not None}

    def metric(self) -> GroupAccuracyMetric:
        return GroupAccuracyMetric("hallusionbench", "aAcc", {"fAcc": "figure", "qAcc": "pair"})
