"""Grounding metrics over one-attribute counterfactual images: Shapes-MMVP and likelihood grounding.

- :class:`MMVPMetric`: pairs of images that differ in exactly one attribute, asked one question whose
  answer differs between them; a pair counts only when both answers are right (MMVP's rule, Tong et al.
  2024), so a model that answers from the question alone (always "yes", say) scores 0.
- :class:`LikelihoodGroundingMetric`: the share of captions more likely under their own image than
  under every one-attribute counterfactual of it, ``logp(y|x,m) > logp(y|x,m')``, overall and per
  attribute. It needs no generation and no answer parsing: it asks whether the model's likelihood of a
  true description depends on the pixels that make it true.

Integer counts reduced by sum, like :mod:`misp.eval.metrics`, so results aggregate exactly across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from misp.eval.parsing import parse_yes_no

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
"""The attributes a counterfactual changes (as in ``misp.world.scene.ATTRIBUTES``), in reporting order."""


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _attribute_index(attributes: Sequence[str], known: tuple[str, ...]) -> list[int]:
    index = {a: i for i, a in enumerate(known)}
    out = []
    for a in attributes:
        if a not in index:
            raise ValueError(f"unknown attribute {a!r}; this metric counts {list(known)}")
        out.append(index[a])
    return out


def _check_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    attributes = tuple(attributes)
    if not attributes or len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes must be distinct and non-empty, got {attributes}")
    return attributes


class MMVPMetric(Metric):
    """Shapes-MMVP pair accuracy, overall and per attribute, and the accuracy of single answers.

    - ``mmvp/pair_accuracy``: pairs with both answers right / pairs.
    - ``mmvp/question_accuracy``: right answers / answers (two per pair), for comparison: the gap to
      pair accuracy is what answering without looking earns.
    - ``mmvp/pairs``: the number of pairs seen.
    - ``mmvp/{attribute}/pair_accuracy``: the same over the pairs that differ in that attribute, for
      every attribute that received a pair.

    Answers are read with :func:`~misp.eval.parsing.parse_yes_no`.

    Args:
        attributes: The attribute names ``update`` accepts, in reporting order.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, attributes: Sequence[str] = ATTRIBUTES, **kwargs):
        super().__init__(**kwargs)
        self.attributes = _check_attributes(attributes)
        for name in ("pairs", "pairs_right", "answers_right"):
            self.add_state(name, default=torch.zeros(len(self.attributes), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        answers_a: Sequence[str],
        answers_b: Sequence[str],
        labels_a: Sequence[str],
        labels_b: Sequence[str],
        attributes: Sequence[str],
    ) -> None:
        """Count one batch of pairs.

        Args:
            answers_a: Raw model answers about each pair's first image.
            answers_b: Raw model answers about its second image.
            labels_a: True answers for the first images, "yes" or "no" (case-insensitive).
            labels_b: True answers for the second images.
            attributes: The attribute each pair's images differ in.
        """
        n = len(answers_a)
        if not (len(answers_b) == len(labels_a) == len(labels_b) == len(attributes) == n):
            raise ValueError(
                "answers_a, answers_b, labels_a, labels_b and attributes differ in length: "
                f"{n}, {len(answers_b)}, {len(labels_a)}, {len(labels_b)}, {len(attributes)}"
            )
        index = _attribute_index(attributes, self.attributes)
        counts = torch.zeros(3, len(self.attributes), dtype=torch.long)
        for i in range(n):
            right = []
            for answer, label in ((answers_a[i], labels_a[i]), (answers_b[i], labels_b[i])):
                truth = label.strip().lower()
                if truth not in ("yes", "no"):
                    raise ValueError(f"MMVP label must be 'yes' or 'no', got {label!r}")
                right.append(parse_yes_no(answer) == truth)
            counts[0, index[i]] += 1
            counts[1, index[i]] += int(all(right))
            counts[2, index[i]] += sum(right)
        self.pairs += counts[0].to(self.pairs.device)
        self.pairs_right += counts[1].to(self.pairs_right.device)
        self.answers_right += counts[2].to(self.answers_right.device)

    def compute(self) -> dict[str, float]:
        """Pooled and per-attribute rates; attributes without pairs are left out; 0/0 rates are 0.0."""
        pairs, right, answers = (t.tolist() for t in (self.pairs, self.pairs_right, self.answers_right))
        out = {
            "mmvp/pair_accuracy": _ratio(sum(right), sum(pairs)),
            "mmvp/question_accuracy": _ratio(sum(answers), 2 * sum(pairs)),
            "mmvp/pairs": float(sum(pairs)),
        }
        for i, attribute in enumerate(self.attributes):
            if pairs[i]:
                out[f"mmvp/{attribute}/pair_accuracy"] = _ratio(right[i], pairs[i])
        return out


class LikelihoodGroundingMetric(Metric):
    """How often a caption is more likely under its own image than under its counterfactuals.

    - ``grounding/likelihood``: captions whose log-probability under their own image is strictly above
      the one under every counterfactual of theirs / captions (captions with no counterfactual are an
      error, not a free win).
    - ``grounding/likelihood_{attribute}``: (caption, counterfactual changing that attribute) cases won
      by the own image / such cases, for every attribute that received a case.
    - ``grounding/captions``: the number of captions seen.

    Ties count as losses: a model that ignores the image scores every image alike and so scores 0.

    Args:
        attributes: The attribute names ``update`` accepts, in reporting order.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, attributes: Sequence[str] = ATTRIBUTES, **kwargs):
        super().__init__(**kwargs)
        self.attributes = _check_attributes(attributes)
        self.add_state("captions", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("captions_won", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("cases", "cases_won"):
            self.add_state(name, default=torch.zeros(len(self.attributes), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, own: Tensor, counterfactual: Tensor, caption: Tensor, attributes: Sequence[str]) -> None:
        """Count one batch of captions.

        Args:
            own: ``[N]`` log-probability of each caption under its own image.
            counterfactual: ``[M]`` log-probability of a caption under one counterfactual image.
            caption: ``[M]`` long, the caption (index into ``own``) each counterfactual score belongs to.
            attributes: ``M`` names, the attribute each counterfactual changes.
        """
        own = torch.as_tensor(own).detach().flatten()
        counterfactual = torch.as_tensor(counterfactual).detach().flatten()
        caption = torch.as_tensor(caption, dtype=torch.long).flatten().to(own.device)
        m = counterfactual.shape[0]
        if caption.shape[0] != m or len(attributes) != m:
            raise ValueError(
                f"counterfactual, caption and attributes differ in length: {m}, {caption.shape[0]}, {len(attributes)}"
            )
        n = own.shape[0]
        if m and (int(caption.min()) < 0 or int(caption.max()) >= n):
            raise ValueError(f"caption indices must lie in [0, {n}), got {caption.tolist()}")
        covered = torch.zeros(n, dtype=torch.bool, device=own.device).index_fill(0, caption, True) if m else None
        if n and (covered is None or not bool(covered.all())):
            missing = [] if covered is None else (~covered).nonzero().flatten().tolist()
            raise ValueError(f"captions {missing or list(range(n))} have no counterfactual score to compare with")
        index = torch.tensor(_attribute_index(attributes, self.attributes), dtype=torch.long, device=own.device)
        won = own.index_select(0, caption) > counterfactual.to(own.device)
        # A caption wins only if it wins against each of its counterfactuals: count its losses.
        losses = torch.zeros(n, dtype=torch.long, device=own.device).index_add(0, caption, (~won).long())
        cases = torch.zeros(len(self.attributes), dtype=torch.long, device=own.device).index_add(
            0, index, torch.ones_like(index)
        )
        cases_won = torch.zeros_like(cases).index_add(0, index, won.long())
        self.captions += n
        self.captions_won += int((losses == 0).sum())
        self.cases += cases.to(self.cases.device)
        self.cases_won += cases_won.to(self.cases_won.device)

    def compute(self) -> dict[str, float]:
        """The pooled share, the per-attribute shares that saw a case, and the caption count."""
        cases, won = self.cases.tolist(), self.cases_won.tolist()
        out = {
            "grounding/likelihood": _ratio(self.captions_won.item(), self.captions.item()),
            "grounding/captions": float(self.captions.item()),
        }
        for i, attribute in enumerate(self.attributes):
            if cases[i]:
                out[f"grounding/likelihood_{attribute}"] = _ratio(won[i], cases[i])
        return out
