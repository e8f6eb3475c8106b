"""POPE and CHAIR as torchmetrics ``Metric`` s (method.md section 6).

Both keep only integer counts as state, reduced by sum, so they aggregate exactly across ranks and
batches (``merge_state``, DDP/FSDP sync) and every rate is computed once, from the totals.

Conventions for empty denominators: a rate whose denominator is zero is reported as 0.0. For POPE this
happens to precision when the model never answers "yes" (and then F1 is 0.0 as well), and to recall
when a split holds no "yes" questions. For CHAIR it happens when no response mentions any object
(CHAIR_i) or no ground-truth object exists (recall).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torchmetrics import Metric

from misp.eval.parsing import MentionExtractor, parse_yes_no

POPE_SPLITS = ("random", "popular", "adversarial")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


class POPEMetric(Metric):
    """POPE accuracy, precision, recall, F1 and yes-ratio per split (positive class = "yes").

    Answers are read with :func:`~misp.eval.parsing.parse_yes_no`. :meth:`compute` returns
    ``{"pope/{split}/{accuracy|precision|recall|f1|yes_ratio}": float}`` for every split that received
    at least one question, and ``"pope/all/..."`` over all questions (always present).

    Args:
        splits: The split names ``update`` accepts, in reporting order.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, splits: Sequence[str] = POPE_SPLITS, **kwargs):
        super().__init__(**kwargs)
        splits = tuple(splits)
        if not splits or len(set(splits)) != len(splits):
            raise ValueError(f"splits must be distinct and non-empty, got {splits}")
        if "all" in splits:
            raise ValueError("'all' is reserved for the pooled result and cannot name a split")
        self.splits = splits
        self._split_index = {s: i for i, s in enumerate(splits)}
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.zeros(len(splits), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: Sequence[str], labels: Sequence[str], splits: Sequence[str]) -> None:
        """Count one batch of answers.

        Args:
            answers: Raw model answers.
            labels: True answers, "yes" or "no" (case-insensitive).
            splits: The split of each question.
        """
        if not (len(answers) == len(labels) == len(splits)):
            raise ValueError(
                f"answers, labels and splits differ in length: {len(answers)}, {len(labels)}, {len(splits)}"
            )
        counts = torch.zeros(4, len(self.splits), dtype=torch.long)
        for answer, label, split in zip(answers, labels, splits, strict=True):
            if split not in self._split_index:
                raise ValueError(f"unknown POPE split {split!r}; this metric counts {list(self.splits)}")
            truth = label.strip().lower()
            if truth not in ("yes", "no"):
                raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
            pred_yes = parse_yes_no(answer) == "yes"
            # rows: tp, fp, tn, fn
            row = (0 if truth == "yes" else 1) if pred_yes else (3 if truth == "yes" else 2)
            counts[row, self._split_index[split]] += 1
        self.tp += counts[0].to(self.tp.device)
        self.fp += counts[1].to(self.fp.device)
        self.tn += counts[2].to(self.tn.device)
        self.fn += counts[3].to(self.fn.device)

    @staticmethod
    def _rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
        n = tp + fp + tn + fn
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        return {
            "accuracy": _ratio(tp + tn, n),
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(tp + fp, n),
        }

    def compute(self) -> dict[str, float]:
        """The rates per split that saw questions, and pooled under "all"; 0/0 rates are 0.0."""
        tp, fp, tn, fn = (t.tolist() for t in (self.tp, self.fp, self.tn, self.fn))
        out: dict[str, float] = {}
        for i, split in enumerate(self.splits):
            if tp[i] + fp[i] + tn[i] + fn[i] == 0:
                continue
            for k, v in self._rates(tp[i], fp[i], tn[i], fn[i]).items():
                out[f"pope/{split}/{k}"] = v
        for k, v in self._rates(sum(tp), sum(fp), sum(tn), sum(fn)).items():
            out[f"pope/all/{k}"] = v
        return out


class CHAIRMetric(Metric):
    """CHAIR_i, CHAIR_s and object recall (Cover) of generated descriptions.

    - ``chair/chair_i``: hallucinated object mentions / all object mentions; every mention counts, so
      "a dog and another dog" is two mentions.
    - ``chair/chair_s``: responses with at least one hallucinated mention / responses.
    - ``chair/recall``: ground-truth objects mentioned / ground-truth objects, counting each distinct
      object once per response, pooled over responses.

    A mention is hallucinated when its canonical object is not among the response's ground-truth
    objects. Mentions are found by :class:`~misp.eval.parsing.MentionExtractor`.

    Args:
        objects: The object vocabulary (canonical names).
        synonyms: Surface form -> canonical name.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, objects: Iterable[str], synonyms: Mapping[str, str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.extractor = MentionExtractor(objects, synonyms)
        for name in (
            "mentions",
            "hallucinated_mentions",
            "responses",
            "hallucinated_responses",
            "gt_objects",
            "gt_covered",
        ):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str], gt_objects: Sequence[Sequence[str]]) -> None:
        """Count one batch of responses against their images' ground-truth objects.

        Args:
            responses: Generated descriptions.
            gt_objects: For each response, the object names present in its image (names or synonyms
                from the vocabulary; any other name is an error, since it could never be matched).
        """
        if len(responses) != len(gt_objects):
            raise ValueError(f"{len(responses)} responses but {len(gt_objects)} ground-truth object lists")
        c = dict.fromkeys(
            ("mentions", "hallucinated_mentions", "hallucinated_responses", "gt_objects", "gt_covered"), 0
        )
        for text, gt in zip(responses, gt_objects, strict=True):
            if isinstance(gt, str):
                raise TypeError(f"each ground truth must be a list of object names, got the string {gt!r}")
            truth = {self.extractor.canonicalise(o) for o in gt}
            mentioned = self.extractor(text)
            hallucinated = sum(m not in truth for m in mentioned)
            c["mentions"] += len(mentioned)
            c["hallucinated_mentions"] += hallucinated
            c["hallucinated_responses"] += int(hallucinated > 0)
            c["gt_objects"] += len(truth)
            c["gt_covered"] += len(truth & set(mentioned))
        self.responses += len(responses)
        for name, value in c.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, float]:
        """``chair/chair_i``, ``chair/chair_s``, ``chair/recall`` and ``chair/object_f1``; 0/0 rates are 0.0.

        ``object_f1`` is the harmonic mean of the mentions' precision (1 - CHAIR_i) and the recall of the
        present objects: a model cannot raise it by naming fewer objects, which lowers CHAIR_i alone.
        """
        mentions = self.mentions.item()
        chair_i = _ratio(self.hallucinated_mentions.item(), mentions)
        recall = _ratio(self.gt_covered.item(), self.gt_objects.item())
        precision = 1.0 - chair_i if mentions else 0.0
        return {
            "chair/chair_i": chair_i,
            "chair/chair_s": _ratio(self.hallucinated_responses.item(), self.responses.item()),
            "chair/recall": recall,
            "chair/object_f1": _ratio(2 * precision * recall, precision + recall),
        }


def format_results(results: Mapping[str, float], digits: int = 4) -> str:
    """An aligned plain-text table of metric results, one table per top-level group.

    Keys ``group/row/column`` (``pope/random/f1``) become cell (row, column) of the group's table;
    keys ``group/column`` (``chair/chair_i``) form a single row named after the group; keys without a
    ``/`` go to a two-column table under "metric". Rows and columns keep first-seen order.

    Args:
        results: Metric name -> value, e.g. the merged outputs of :class:`POPEMetric` and
            :class:`CHAIRMetric`.
        digits: Decimals shown.

    Returns:
        The tables separated by blank lines (empty string for empty results).
    """
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) == 1:
            group, row, col = "metric", key, "value"
        elif len(parts) == 2:
            group, row, col = parts[0], parts[0], parts[1]
        else:
            group, row, col = parts[0], "/".join(parts[1:-1]), parts[-1]
        groups.setdefault(group, {}).setdefault(row, {})[col] = float(value)

    tables = []
    for group, rows in groups.items():
        cols: list[str] = []
        for cells in rows.values():
            cols.extend(c for c in cells if c not in cols)
        header = [group, *cols]
        body = [
            [row, *(f"{cells[c]:.{digits}f}" if c in cells else "" for c in cols)]
            for row, cells in rows.items()
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in [header, *body]
        ]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
