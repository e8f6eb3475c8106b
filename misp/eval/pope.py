"""POPE (Li et al. 2023): "Is there a <object> in the image?" on COCO val2014, three splits.

Files, as released in AoiDragon/POPE (``output/coco/``) and lmms-eval: ``coco_pope_random.json``,
``coco_pope_popular.json`` and ``coco_pope_adversarial.json``, each JSON Lines of ``question_id``,
``image`` (a COCO val2014 file name), ``text`` and ``label`` ("yes"/"no"). misp reads them from
``<data_root>/pope/`` (``.json`` or ``.jsonl``) and the images from ``<data_root>/pope/val2014/``.

Scoring is POPE's ``evaluate.py``: a negation in the first sentence is "no", anything else "yes"; then
accuracy, precision, recall, F1 ("yes" positive) and yes-ratio per split. An empty answer is the one
answer that rule cannot read; it is counted as unreadable and scored wrong, not as "yes".
"""

from __future__ import annotations

from pathlib import Path

from misp.data.records import RecordError, read_pope_questions
from misp.eval.answers import read_pope
from misp.eval.benchmark import Benchmark, GroupedBinaryMetric, Question, warn_unreadable
from misp.eval.metrics import POPE_SPLITS

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short answers, appended to every POPE question as its evaluation does."""


class POPE(Benchmark):
    """POPE's three COCO splits, scored per split and pooled."""

    name = "pope"
    max_new_tokens = 16

    def _file(self, split: str) -> Path | None:
        for suffix in (".json", ".jsonl"):
            path = self.root / f"coco_pope_{split}{suffix}"
            if path.is_file():
                return path
        return None

    def questions(self) -> list[Question]:
        found = {split: self._file(split) for split in POPE_SPLITS}
        if not any(found.values()):
            raise RecordError(self.root, None, None, "holds none of coco_pope_{random,popular,adversarial}.json "
                              "(POPE's files; see docs/evaluation.md)")
        out: list[Question] = []
        for split, path in found.items():
            if path is None:
                continue
            self.source = path
            read = read_pope_questions(path, image_root=self.root / "val2014", layout="pope", split=split)
            out += [
                Question(f"{split}/{q.id}", Path(q.image), q.question + PROMPT_SUFFIX,
                         {"split": split, "label": q.label, "file": str(path)})
                for q in self._limited(list(read.records))
            ]
        return out

    def judge(self, question: Question, answer: str) -> dict:
        pred = read_pope(answer)
        if pred is None:
            warn_unreadable(Path(question.meta["file"]), question.id, answer, "a POPE yes/no answer")
        return {"group": question.meta["split"], "truth": question.meta["label"], "pred": pred,
                "readable": pred is not None}

    def metric(self) -> GroupedBinaryMetric:
        return GroupedBinaryMetric("pope", POPE_SPLITS, positive="yes", ratio_name="yes_ratio")
