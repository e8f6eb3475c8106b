"""The terms a preference objective sums, each a small class over the pure losses of ``misp.losses``.

A term takes the step's log-probs (``TermInputs``: policy and reference, the image advantages computed once,
the draws' proposal log q) and returns per-example losses ``[B]`` and its own metrics. It declares what it
needs, so a method is checked before anything loads (``misp.dpo.method.Method``):

| term              | loss (method.md)                              | needs                                        |
| ----------------- | --------------------------------------------- | -------------------------------------------- |
| ``TextDPO``       | L_text                                        | -                                            |
| ``PlackettLuce``  | L_img(S), or L_img^IS with importance sampling | negatives; IS: draws with a proposal log q   |
| ``Anchor``        | L_anc (mDPO's AncPO)                          | -                                            |
| ``ProposalFit``   | KL(p_theta ‖ q_phi), trains q_phi             | negatives drawn from the learnable q_phi     |

A new term is a subclass with ``name``, its needs and ``__call__``; a config names it by ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from misp.losses import (
    anchor_loss,
    dpo_loss,
    importance_weight_stats,
    plackett_luce_loss,
    proposal_loss,
)


@dataclass
class SequenceLogps:
    """Summed response log-probs of one step, policy or reference."""

    chosen: Tensor
    """[B] log p(y_p | x, m_p)."""
    rejected: Tensor
    """[B] log p(y_n | x, m_p)."""
    negatives: Tensor
    """[B, K] log p(y_p | x, m_i) for each drawn negative image (K may be 0)."""


@dataclass
class TermInputs:
    """Everything a term may read in one training step."""

    policy: SequenceLogps
    reference: SequenceLogps
    beta: float
    """KL-penalty strength shared by every term."""
    advantages: Tensor | None = None
    """[B, K] image advantages a_i = beta [r(y_p|m_i) - r(y_p|m_p)], with gradient (None without negatives)."""
    log_q: Tensor | None = None
    """[B, K] log-probability of each draw under the proposal that drew it (the epoch's q)."""
    log_q_phi: Tensor | None = None
    """[B, K] log-probability of each draw under the current, trainable q_phi (when a term trains it)."""


class LossTerm(ABC):
    """One weighted term of a preference objective (abstract: a term is a subclass with ``__call__``).

    Args:
        weight: the term's multiplier in the sum.
    """

    name: ClassVar[str] = "term"
    """Prefix of the term's logged loss (``loss/<name>``)."""
    needs_negatives: ClassVar[bool] = False
    """Reads the negatives' log-probs (the data must draw K >= 1 negatives)."""
    needs_proposal_log_q: ClassVar[bool] = False
    """Reads the log q of each draw: the source must draw from a proposal distribution over a candidate list."""
    trains_proposal: ClassVar[bool] = False
    """Trains the learnable proposal q_phi (the source must draw from it)."""

    def __init__(self, weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"{type(self).__name__}.weight must be > 0, got {weight}")
        self.weight = float(weight)

    @abstractmethod
    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-example losses ``[B]`` (unweighted) and the term's metrics."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class TextDPO(LossTerm):
    """Text DPO, the image fixed to the positive: ``L_text = -log sigma(beta [r(y_p|m_p) - r(y_n|m_p)])``."""

    name = "text"

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        p, r = x.policy, x.reference
        losses, chosen, rejected = dpo_loss(p.chosen, p.rejected, r.chosen, r.rejected, x.beta)
        return losses, {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": p.chosen.detach().mean(),
            "logps/rejected": p.rejected.detach().mean(),
        }


class PlackettLuce(LossTerm):
    """The positive image must rank above every drawn negative: ``L_img = softplus(LSE_i a_i)``.

    With one negative this is mDPO's conditional loss; with ``importance_sampling`` it is MISP-DPO's
    ``L_img^IS`` (method.md 4.5), the draws reweighted by their proposal log q into an estimate of the
    loss over the whole candidate pool.

    Args:
        weight: the term's multiplier.
        importance_sampling: subtract log q and log K inside the LSE (false: the "no IS" ablation).
    """

    name = "image"
    needs_negatives = True

    def __init__(self, weight: float = 1.0, importance_sampling: bool = False) -> None:
        super().__init__(weight)
        self.importance_sampling = bool(importance_sampling)

    @property
    def needs_proposal_log_q(self) -> bool:  # type: ignore[override]
        return self.importance_sampling

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        p, r = x.policy, x.reference
        log_q = x.log_q if self.importance_sampling else None
        # From the log-probs, not from x.advantages: the same values, but autograd then sums the gradient
        # in another order, and the trained weights would differ from earlier releases' in the last bits.
        losses = plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, x.beta, log_q=log_q)
        a = x.advantages.detach()
        metrics = {
            "rewards/img_pos": (x.beta * (p.chosen - r.chosen)).detach().mean(),
            "rewards/img_neg": (x.beta * (p.negatives - r.negatives)).detach().mean(),
            "img/accuracies": (a < 0).all(dim=1).float().mean(),
            "img/advantage_mean": a.mean(),
            "img/advantage_max": a.max(dim=1).values.mean(),
            # The spread over every draw of the batch: whether the a_i are all far below 0 (the term is
            # satisfied and its softplus gradient vanishes) or a tail of hard negatives remains.
            "img/advantage_std": a.float().std(correction=0),
            "img/advantage_p10": torch.quantile(a.float().flatten(), 0.1),
            "img/advantage_p90": torch.quantile(a.float().flatten(), 0.9),
            "logps/negatives": p.negatives.detach().mean(),
        }
        if self.importance_sampling:
            ess, max_weight = importance_weight_stats(a, x.log_q)
            metrics |= {"is/ess": ess.mean(), "is/max_weight": max_weight.mean()}
        return losses, metrics


class Anchor(LossTerm):
    """mDPO's anchor: ``L_anc = -log sigma(beta r(y_p|x,m_p) - delta)`` keeps the chosen reward from falling.

    Args:
        weight: the term's multiplier.
        delta: the anchor's margin.
    """

    name = "anchor"

    def __init__(self, weight: float = 1.0, delta: float = 0.0) -> None:
        super().__init__(weight)
        self.delta = float(delta)

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        return anchor_loss(x.policy.chosen, x.reference.chosen, x.beta, self.delta), {}


class ProposalFit(LossTerm):
    """Moves q_phi toward the model's own preference over the negatives (method.md 4.4).

    The self-normalised estimate of ``KL(p_theta || q_phi)`` on the drawn negatives, advantages detached:
    it trains q_phi only, never the policy.
    """

    name = "proposal"
    needs_negatives = True
    needs_proposal_log_q = True
    trains_proposal = True

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        losses = proposal_loss(x.advantages.detach(), x.log_q, x.log_q_phi)
        return losses, {}


def weighted_term_losses(terms: list[LossTerm], x: TermInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each term's weighted per-example losses ``[B]`` by name (in the terms' order) and all their metrics.

    Kept apart from their sum so that a diagnostic can take each term's gradient on its own
    (``misp.dpo.diagnostics.gradient_shares``).
    """
    weighted: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    for term in terms:
        losses, own = term(x)
        metrics[f"loss/{term.name}"] = losses.detach().mean()
        metrics |= own
        weighted[term.name] = term.weight * losses
    return weighted, metrics


def sum_terms(weighted: dict[str, Tensor]) -> Tensor:
    """The per-example total ``[B]`` of weighted term losses, summed in the terms' order."""
    total: Tensor | None = None
    for losses in weighted.values():
        total = losses if total is None else total + losses
    if total is None:
        raise ValueError("a preference objective needs at least one term")
    return total


def uses_negatives(terms: list[LossTerm]) -> bool:
    return any(t.needs_negatives for t in terms)


__all__ = [
    "Anchor",
    "LossTerm",
    "PlackettLuce",
    "ProposalFit",
    "SequenceLogps",
    "TermInputs",
    "TextDPO",
    "sum_terms",
    "uses_negatives",
    "weighted_term_losses",
]
