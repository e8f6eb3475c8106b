"""What every published benchmark of ``misp eval`` provides, and the counting they share.

A benchmark reads its files exactly as its authors release them (:meth:`Benchmark.questions`), turns
one answer into a judgement that holds everything its score needs (:meth:`Benchmark.judge`, stored in
``generations/<name>.jsonl`` beside the answer, so a run can be re-scored from that file alone), and
counts judgements in a torchmetrics ``Metric`` whose states are integer counts reduced by sum, so that
results merge exactly across batches and ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics import Metric

from misp.data.records import RecordError, read_utf8
from misp.images import verify_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """One prompt of a benchmark, about one image."""

    id: str
    """Unique within the benchmark (written to the generations file; resuming skips ids found there)."""
    image: Path
    """The image file."""
    prompt: str
    """The user's text as the model sees it (without the chat template)."""
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    """What :meth:`Benchmark.judge` needs to score the answer (label, split, options, ...)."""
    max_new_tokens: int | None = None
    """This question's longest answer when it differs from the benchmark's (AMBER's descriptions)."""


class Benchmark(ABC):
    """One published benchmark: its reader, its answer judge and its metric.

    Args:
        root: The folder holding the benchmark's files in its authors' layout (see docs/evaluation.md).
        limit: Keep the first ``limit`` questions only (a quick look; scores are then not comparable).
    """

    name: str = ""
    """The benchmark's name in ``--benchmarks``, results keys and ``generations/<name>.jsonl``."""
    max_new_tokens: int = 64
    """Longest answer generated, as the benchmark's reference evaluation sets it."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        self.root = Path(root)
        self.limit = limit
        self.source = self.root  # the file questions came from, named in warnings about answers

    @abstractmethod
    def questions(self) -> list[Question]:
        """Every question, read and checked up front (a bad file or a missing image: a RecordError)."""

    @abstractmethod
    def judge(self, question: Question, answer: str) -> dict:
        """The parsed judgement of one answer: what the metric counts, JSON-serialisable.

        It holds ``"readable": False`` when the answer could not be read (counted apart, scored wrong).
        """

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh metric whose ``update`` takes a list of judgements."""

    def _limited(self, questions: list[Question]) -> list[Question]:
        return questions if self.limit is None else questions[: self.limit]


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a RecordError naming it and what it should be."""
    if not path.is_file():
        raise RecordError(path, None, None, f"not found: the {what} (see docs/evaluation.md for the layout)")
    return path


def read_json_array(path: Path) -> list:
    """The records of a question file that holds one JSON array, or a ``RecordError`` naming file and line."""
    try:
        rows = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise RecordError(path, e.lineno, None, f"not valid JSON: {e.msg}") from None
    if not isinstance(rows, list):
        raise RecordError(path, None, None, "must hold one JSON array of question records")
    return rows


def check_images(questions: Sequence[Question], source: Path) -> None:
    """Open every distinct image once; a missing or unreadable one is a RecordError naming the question."""
    seen: set[Path] = set()
    for q in questions:
        if q.image in seen:
            continue
        seen.add(q.image)
        reason = verify_image(q.image)
        if reason is not None:
            raise RecordError(source, None, None, f"question {q.id}: image {q.image}: {reason}")


def warn_unreadable(source: Path, question_id: str, answer: str, expected: str) -> None:
    """The one line an unreadable answer earns: the file, the question id and the answer."""
    shown = answer if len(answer) <= 80 else answer[:77] + "..."
    log.warning("%s: question %s: cannot read %r as %s; counted as unreadable (scored wrong)",
                source, question_id, shown, expected)


def ratio(num: float, den: float) -> float:
    """``num / den``, 0.0 when ``den`` is 0."""
    return float(num) / float(den) if den else 0.0


BINARY_COUNTS = ("tp", "fp", "tn", "fn", "unreadable_pos", "unreadable_neg")
"""A binary question's outcomes: the four cells, and unreadable answers by true label."""


def binary_outcome(pred: str | None, truth: str, positive: str) -> int:
    """Index into :data:`BINARY_COUNTS` of one answer (``pred`` None: unreadable)."""
    pos = truth == positive
    if pred is None:
        return 4 if pos else 5
    if pred == positive:
        return 0 if pos else 1
    return 3 if pos else 2


def binary_rates(counts: Sequence[int]) -> dict[str, float]:
    """Accuracy, precision, recall, F1, the positive-answer ratio and unreadable answers of one group.

    Unreadable answers are wrong: in the denominator of accuracy and the ratio, and, when the truth was
    positive, a miss for recall. With none, these are the reference scripts' formulas.
    """
    tp, fp, tn, fn, upos, uneg = (int(c) for c in counts)
    n = tp + fp + tn + fn + upos + uneg
    precision = ratio(tp, tp + fp)
    recall = ratio(tp, tp + fn + upos)
    return {
        "accuracy": ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "positive_ratio": ratio(tp + fp, n),
        "unreadable": float(upos + uneg),
        "questions": float(n),
    }


class GroupedBinaryMetric(Metric):
    """Binary outcomes counted per group (a POPE split, an AMBER type), reported per group and pooled.

    Args:
        prefix: Results key prefix (``pope``).
        groups: The group names ``update`` accepts, in reporting order.
        positive: The positive answer ("yes" for POPE, "no" for AMBER).
        ratio_name: The name of the positive-answer ratio in the results (``yes_ratio``).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, prefix: str, groups: Sequence[str], positive: str = "yes",
                 ratio_name: str = "yes_ratio", pooled: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        self.prefix, self.groups, self.positive = prefix, tuple(groups), positive
        self.ratio_name, self.pooled = ratio_name, pooled
        self._index = {g: i for i, g in enumerate(self.groups)}
        self.add_state("counts", default=torch.zeros(len(self.groups), len(BINARY_COUNTS), dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, judgements: Sequence[dict]) -> None:
        """Count judgements holding ``group``, ``truth`` and ``pred`` (None: unreadable)."""
        counts = torch.zeros_like(self.counts)
        for j in judgements:
            if j["group"] not in self._index:
                raise ValueError(f"unknown {self.prefix} group {j['group']!r}; known: {list(self.groups)}")
            counts[self._index[j["group"]], binary_outcome(j["pred"], j["truth"], self.positive)] += 1
        self.counts += counts

    def _named(self, counts) -> dict[str, float]:
        rates = binary_rates(counts)
        rates[self.ratio_name] = rates.pop("positive_ratio")
        return rates

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        counts = self.counts.tolist()
        for group, row in zip(self.groups, counts, strict=True):
            if sum(row):
                out.update({f"{self.prefix}/{group}/{k}": v for k, v in self._named(row).items()})
        if self.pooled:
            total = [sum(col) for col in zip(*counts, strict=True)]
            out.update({f"{self.prefix}/{self.pooled}/{k}": v for k, v in self._named(total).items()})
        return out


class GroupAccuracyMetric(Metric):
    """Accuracy per question and per group of questions that must all be right (MMVP's pairs,
    HallusionBench's figures and question pairs).

    A group's questions may land in different batches or ranks, so the state is one row per judged
    question, ``[correct, key of group 1, key of group 2, ...]`` (``cat``-reduced across ranks), and
    groups are formed in :meth:`compute`. A key is a stable 56-bit hash of the group's name, the same
    on every rank.

    Args:
        prefix: Results key prefix (``mmvp``).
        question_name: The name of per-question accuracy in the results (``aAcc``).
        groups: Result name -> the judgement key naming a question's group (``{"qAcc": "pair"}``).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, prefix: str, question_name: str, groups: dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.prefix, self.question_name, self.groups = prefix, question_name, dict(groups)
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("unreadable", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, judgements: Sequence[dict]) -> None:
        """Count judgements holding ``correct``, ``readable`` and each group's key."""
        rows = [[int(bool(j["correct"])), *(_stable_id(str(j[k])) for k in self.groups.values())] for j in judgements]
        self.rows.append(torch.tensor(rows, dtype=torch.long).reshape(-1, 1 + len(self.groups)))
        self.unreadable += sum(not j["readable"] for j in judgements)

    def compute(self) -> dict[str, float]:
        rows = self.rows if isinstance(self.rows, torch.Tensor) else (
            torch.cat(self.rows) if self.rows else torch.zeros(0, 1 + len(self.groups), dtype=torch.long))
        rows = rows.reshape(-1, 1 + len(self.groups)).tolist()
        correct = [r[0] for r in rows]
        out = {f"{self.prefix}/{self.question_name}": ratio(sum(correct), len(correct))}
        for g, name in enumerate(self.groups):
            members: dict[int, list[int]] = {}
            for r in rows:
                members.setdefault(r[1 + g], []).append(r[0])
            out[f"{self.prefix}/{name}"] = ratio(sum(all(v) for v in members.values()), len(members))
        out[f"{self.prefix}/questions"] = float(len(rows))
        out[f"{self.prefix}/unreadable"] = float(self.unreadable)
        return out


def _stable_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")
