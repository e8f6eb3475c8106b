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
| ``ImageRanking``  | LPOI's listwise L_list over ranked negatives  | negatives in rank order (``occlude``)        |
| ``ResponsePairs`` | SymMPO's / IC-VCO's two response pairs        | each edit's own response (``paired``)        |
| ``PairMargin``    | SymMPO's squared margin difference            | ``paired``                                   |
| ``PairAnchors``   | anchors on both chosen cells of the pairs     | ``paired``                                   |
| ``VCDist``        | IC-VCO's gated distillation                   | ``paired``, spans, the two-image context     |

``PlackettLuce`` and ``ImageRanking`` take CW-DPO's cooling weight (``cooling: {floor, tau}``, method.md 9.4);
``PlackettLuce`` with importance sampling takes the jackknife estimator (``estimator: jackknife``, method.md 4.5).

A new term is a subclass with ``name``, its needs and ``__call__``; a config names it by ``class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from misp.losses import (
    ESTIMATORS,
    Estimator,
    anchor_loss,
    cool_gradient,
    cooling_weights,
    distillation_loss,
    dpo_loss,
    image_advantages,
    importance_weight_stats,
    masked_logps,
    plackett_luce_loss,
    proposal_loss,
    ranking_loss,
    response_pair_logits,
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
class PairedLogps:
    """One model's summed log-probs of each negative image's own correct response ``y_i`` (the edit's caption).

    With ``SequenceLogps.chosen`` (``y_p | m_p``) and ``.negatives`` (``y_p | m_i``) these complete the
    2 x 2 table of images (m_p, m_i) by responses (y_p, y_i) that SymMPO and IC-VCO pair.
    """

    own: Tensor
    """[B, K] log p(y_i | x, m_i): the edit's response under the edit."""
    swapped: Tensor
    """[B, K] log p(y_i | x, m_p): the edit's response under the positive image."""


@dataclass
class PairedResponses:
    """Policy and reference ``PairedLogps`` of one step."""

    policy: PairedLogps
    reference: PairedLogps
    valid: Tensor | None = None
    """[B, K] bool: the draws that have their own response (a mixed pool draws retrieved images too); the pair
    terms average over these only, and an example with none gives 0. None: every draw has one."""


@dataclass
class ResponseCells:
    """One model's summed log-probs of an edit's 2 x 2 table: responses (y_p, y_i) by contexts (c_p, c_i).

    The contexts are the two images (single-image branch) or IC-VCO's two-image prompt with the anchor
    "answer based on the first image" (c_p) or "... second image" (c_i). All ``[B, K]``.
    """

    chosen: Tensor
    """log p(y_p | c_p)."""
    swapped: Tensor
    """log p(y_i | c_p)."""
    own: Tensor
    """log p(y_i | c_i)."""
    chosen_edit: Tensor
    """log p(y_p | c_i)."""


@dataclass
class InContextPairs:
    """Policy and reference ``ResponseCells`` in IC-VCO's two-image context ``[m_p, m_i]``."""

    policy: ResponseCells
    reference: ResponseCells


@dataclass
class CellTokenLogps:
    """One model's per-token log-probs of the four cells of each edit, padded (any value at padding).

    ``T`` is the padded length of ``y_p``'s tokens and ``T'`` that of the edits' responses.
    """

    chosen: Tensor
    """[B, T] per-token log p(y_p | x, m_p)."""
    chosen_edit: Tensor
    """[B, K, T] per-token log p(y_p | x, m_i)."""
    own: Tensor
    """[B, K, T'] per-token log p(y_i | x, m_i)."""
    swapped: Tensor
    """[B, K, T'] per-token log p(y_i | x, m_p)."""


@dataclass
class EditSpans:
    """IC-VCO's token masks: which response tokens lie in the span an edit changed, and the per-token log-probs
    the single-image branch sums over them (``misp.losses.masked_logps``)."""

    policy: CellTokenLogps
    reference: CellTokenLogps
    chosen_mask: Tensor
    """[B, K, T] bool: the tokens of y_p inside the span that edit i changes (padding False)."""
    own_mask: Tensor
    """[B, K, T'] bool: the tokens of y_i inside its edited span (padding False)."""


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
    paired: PairedResponses | None = None
    """Each negative image's own correct response under both images (SymMPO, IC-VCO); None when the source
    gives none."""
    spans: EditSpans | None = None
    """Per-token log-probs of the four image x response cells and the edited span's tokens (IC-VCO)."""
    in_context: InContextPairs | None = None
    """The pairs in IC-VCO's two-image context (families that take several images in one prompt)."""


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
    needs_ranked_negatives: ClassVar[bool] = False
    """Reads the K negatives as a ranking (column k ranks above column k + 1): the source must draw them so."""
    needs_paired_responses: ClassVar[bool] = False
    """Reads each negative's own correct response (``TermInputs.paired``): the source must give one."""
    needs_edit_spans: ClassVar[bool] = False
    """Reads the edited span's token masks (``TermInputs.spans``)."""
    needs_in_context: ClassVar[bool] = False
    """Reads the pairs in a two-image context (``TermInputs.in_context``)."""

    def __init__(self, weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"{type(self).__name__}.weight must be > 0, got {weight}")
        self.weight = float(weight)

    def problems(self, k: int | None) -> list[str]:
        """What contradicts itself in the term's settings, or the ``k`` negatives drawn per record (None: the
        source draws none), one sentence each; ``misp.dpo.method`` reports them with the method's own."""
        return []

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


@dataclass
class Cooling:
    """CW-DPO's cooling weight on an image term's negatives (method.md 9.4): ``w_i = sigmoid((a_i - floor) / tau)``
    scales the gradient negative i sends through its own log-prob, so a solved negative (``a_i`` well below
    ``floor``) stops pushing while the loss value, and every other negative's gradient, stay as they were."""

    floor: float = -2.0
    """The image advantage ``a_i`` at which the weight is 1/2 (below: solved, cooled)."""
    tau: float = 0.5
    """Width of the transition in advantage units (w = 0.018 at floor - 2, 0.98 at floor + 2 with tau 0.5)."""

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"cooling.tau must be > 0, got {self.tau}")


def _cooled_negatives(x: TermInputs, cooling: Cooling | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy's negative log-probs, their gradient scaled by the cooling weights, and the weights' metrics."""
    if cooling is None:
        return x.policy.negatives, {}
    a = image_advantages(x.policy.chosen, x.policy.negatives, x.reference.chosen, x.reference.negatives, x.beta)
    w = cooling_weights(a, cooling.floor, cooling.tau)
    metrics = {"cool/weight_mean": w.mean(), "cool/unsolved_share": (w > 0.5).float().mean()}
    return cool_gradient(x.policy.negatives, w), metrics


class PlackettLuce(LossTerm):
    """The positive image must rank above every drawn negative: ``L_img = softplus(LSE_i a_i)``.

    With one negative this is mDPO's conditional loss; with ``importance_sampling`` it is MISP-DPO's
    ``L_img^IS`` (method.md 4.5), the draws reweighted by their proposal log q into an estimate of the
    loss over the whole candidate pool: the plug-in ``log(1 + Z^)``, biased low, or its jackknife
    correction (``estimator: jackknife``, K >= 2).

    Args:
        weight: the term's multiplier.
        importance_sampling: subtract log q and log K inside the LSE (false: the "no IS" ablation).
        cooling: CW-DPO's cooling weight on each negative (None: every negative pushes with its softmax share).
        estimator: how the importance-sampled loss estimates the full-pool ``log(1 + Z)``: ``plugin``
            (``log(1 + Z^)``, MISP-DPO as published) or ``jackknife`` (``K f(Z^) - (K-1)/K sum_j f(Z^_{-j})``,
            most of the plug-in's bias removed for a few percent more spread; needs importance sampling and K >= 2).
    """

    name = "image"
    needs_negatives = True

    def __init__(
        self,
        weight: float = 1.0,
        importance_sampling: bool = False,
        cooling: Cooling | None = None,
        estimator: Estimator = "plugin",
    ) -> None:
        super().__init__(weight)
        if estimator not in ESTIMATORS:
            raise ValueError(f"PlackettLuce.estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.importance_sampling = bool(importance_sampling)
        self.cooling = cooling
        self.estimator = estimator

    @property
    def needs_proposal_log_q(self) -> bool:  # type: ignore[override]
        return self.importance_sampling

    def problems(self, k: int | None) -> list[str]:
        if self.estimator != "jackknife":
            return []
        if not self.importance_sampling:
            return ["estimator: jackknife corrects the importance-sampled estimate, so it needs importance_sampling: "
                    "true (without it the loss over the drawn negatives is exact and there is no bias to correct)"]
        if k is not None and k < 2:
            return [f"estimator: jackknife leaves one draw out, so it needs negatives.k >= 2, got k={k}; use "
                    "estimator: plugin with one draw"]
        return []

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        p, r = x.policy, x.reference
        log_q = x.log_q if self.importance_sampling else None
        # From the log-probs, not from x.advantages: the same values, but autograd then sums the gradient
        # in another order, and the trained weights would differ from earlier releases' in the last bits.
        negatives, cool_metrics = _cooled_negatives(x, self.cooling)
        losses = plackett_luce_loss(
            p.chosen, negatives, r.chosen, r.negatives, x.beta, log_q=log_q, estimator=self.estimator
        )
        a = x.advantages.detach()
        metrics = cool_metrics | {
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
        if self.estimator == "jackknife":
            # The correction the jackknife adds to the plug-in: its estimate of the plug-in's (negative) bias.
            with torch.no_grad():
                plugin = plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, x.beta, log_q=log_q)
            metrics["is/jackknife_correction"] = (losses.detach() - plugin).mean()
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


class ImageRanking(LossTerm):
    """LPOI's listwise term: the positive ranks above occlusion level 1, which ranks above level 2, ...

    ``L_list = sum_k [LSE_{j >= k} s_j - s_k]`` with ``s = beta r(y_p | x, image)`` over the positive and the
    K negatives in the order the source drew them (``data.source: occlude``). With K = 1 it is mDPO's
    conditional loss. LPOI is ``TextDPO + ImageRanking + Anchor``.

    Args:
        weight: the term's multiplier.
        cooling: CW-DPO's cooling weight on each negative (its advantage against the positive decides).
    """

    name = "ranking"
    needs_negatives = True
    needs_ranked_negatives = True

    def __init__(self, weight: float = 1.0, cooling: Cooling | None = None) -> None:
        super().__init__(weight)
        self.cooling = cooling

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        p, r = x.policy, x.reference
        negatives, metrics = _cooled_negatives(x, self.cooling)
        losses = ranking_loss(p.chosen, negatives, r.chosen, r.negatives, x.beta)
        s = (x.beta * (p.negatives - r.negatives)).detach()
        pos = (x.beta * (p.chosen - r.chosen)).detach()
        metrics |= {
            # the whole list in order: the positive first, then each level below the one before
            "ranking/accuracies": ((pos.unsqueeze(-1) > s[:, :1]).all(-1) & (s[:, :-1] > s[:, 1:]).all(-1)).float().mean(),
            "ranking/top_accuracies": (pos.unsqueeze(-1) > s).all(-1).float().mean(),
            "rewards/img_pos": pos.mean(),
            "rewards/img_neg": s.mean(),
        }
        return losses, metrics


Context = Literal["single", "in_context"]


def _cells(x: TermInputs, context: str, token_mask: bool) -> tuple[ResponseCells, ResponseCells]:
    """Policy and reference cells of each edit's 2 x 2 table, in the context and token span a term reads."""
    if context == "in_context":
        return x.in_context.policy, x.in_context.reference
    if token_mask:
        sp = x.spans

        def summed(t: CellTokenLogps) -> ResponseCells:
            k = sp.chosen_mask.shape[1]
            chosen = t.chosen.unsqueeze(1).expand(-1, k, -1)
            return ResponseCells(
                masked_logps(chosen, sp.chosen_mask), masked_logps(t.swapped, sp.own_mask),
                masked_logps(t.own, sp.own_mask), masked_logps(t.chosen_edit, sp.chosen_mask),
            )

        return summed(sp.policy), summed(sp.reference)

    def cells(seq: SequenceLogps, paired: PairedLogps) -> ResponseCells:
        return ResponseCells(seq.chosen.unsqueeze(-1).expand_as(paired.own), paired.swapped, paired.own, seq.negatives)

    return cells(x.policy, x.paired.policy), cells(x.reference, x.paired.reference)


class _PairTerm(LossTerm):
    """A term over each edit's response pairs, in one context, over whole responses or the edited span."""

    base_name: ClassVar[str] = "pairs"
    needs_negatives = True
    needs_paired_responses = True

    def __init__(self, weight: float = 1.0, context: Context = "single", token_mask: bool = False) -> None:
        super().__init__(weight)
        if context not in ("single", "in_context"):
            raise ValueError(f"{type(self).__name__}.context must be 'single' or 'in_context', got {context!r}")
        if token_mask and context != "single":
            raise ValueError(f"{type(self).__name__}: token_mask applies to the single-image context only (as in IC-VCO)")
        self.context = context
        self.token_mask = bool(token_mask)

    @property
    def name(self) -> str:  # type: ignore[override]
        # one objective may hold the same term in several contexts (IC-VCO): each logs under its own name
        return self.base_name + ("_span" if self.token_mask else "") + ("_ic" if self.context == "in_context" else "")

    @property
    def needs_edit_spans(self) -> bool:  # type: ignore[override]
        return self.token_mask

    @property
    def needs_in_context(self) -> bool:  # type: ignore[override]
        return self.context == "in_context"

    @staticmethod
    def edit_mean(losses: Tensor, x: TermInputs) -> Tensor:
        """``[B, K]`` -> ``[B]``: the mean over the edits, or over the draws with their own response only."""
        valid = x.paired.valid if x.paired is not None else None
        if valid is None:
            return losses.mean(-1)
        v = valid.to(losses.dtype)
        return (losses * v).sum(-1) / v.sum(-1).clamp_min(1)

    @staticmethod
    def valid_share(values: Tensor, x: TermInputs) -> Tensor:
        """The mean of ``values [B, K]`` over the draws with their own response (a metric)."""
        valid = x.paired.valid if x.paired is not None else None
        if valid is None:
            return values.float().mean()
        return values.float()[valid].mean() if bool(valid.any()) else values.new_zeros((), dtype=torch.float)

    def logits(self, x: TermInputs) -> tuple[Tensor, Tensor]:
        pc, rc = _cells(x, self.context, self.token_mask)
        return response_pair_logits(pc.chosen, pc.swapped, pc.own, pc.chosen_edit,
                                    rc.chosen, rc.swapped, rc.own, rc.chosen_edit)


class ResponsePairs(_PairTerm):
    """Both response pairs of each edit (SymMPO's lambda term, IC-VCO's branch loss), averaged over the K edits::

        L_pairs = mean_i [ -log sigma(beta l_p) - log sigma(beta l_i) ]
        l_p = r(y_p|c_p) - r(y_i|c_p),   l_i = r(y_i|c_i) - r(y_p|c_i)

    The context is shared inside each pair, so its partition function cancels (method.md 9.1).

    Args:
        weight: the term's multiplier (SymMPO's lambda).
        context: ``single`` (each image alone) or ``in_context`` (IC-VCO's two-image prompt).
        token_mask: sum the log-probs over the edited span's tokens only (IC-VCO's single-image branch).
    """

    base_name = "pairs"

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_p, l_i = self.logits(x)
        losses = -F.logsigmoid(x.beta * l_p) - F.logsigmoid(x.beta * l_i)
        return self.edit_mean(losses, x), {
            f"{self.name}/accuracy_positive": self.valid_share(l_p > 0, x).detach(),
            f"{self.name}/accuracy_edit": self.valid_share(l_i > 0, x).detach(),
            f"{self.name}/margin": self.valid_share(x.beta * (l_p + l_i) / 2, x).detach(),
        }


class PairMargin(_PairTerm):
    """SymMPO's symmetric margin term: ``mean_i (l_p - l_i)^2`` on the raw pair logits (no beta), which keeps
    the two pairs' margins alike. The released code weighs it 1e-4.

    Args:
        weight: the term's multiplier (SymMPO's 1e-4).
        context: ``single`` or ``in_context``.
        token_mask: over the edited span only.
    """

    base_name = "margin"

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        l_p, l_i = self.logits(x)
        return self.edit_mean((l_p - l_i).pow(2), x), {}


class PairAnchors(_PairTerm):
    """Anchors on both chosen cells of the pairs: ``-log sigma(beta r(y_p|c_p) - delta) - log sigma(beta r(y_i|c_i) - delta)``
    (mean over the K edits). SymMPO's two anchors (on (m, y_w) and (m', y'_w)); IC-VCO's anchor on each
    branch's chosen responses.

    Args:
        weight: the term's multiplier.
        delta: the anchors' margin.
        context: ``single`` or ``in_context``.
        token_mask: over the edited span only (IC-VCO's single-image branch anchors the masked sums).
    """

    base_name = "pair_anchors"

    def __init__(self, weight: float = 1.0, delta: float = 0.0, context: Context = "single", token_mask: bool = False) -> None:
        super().__init__(weight, context, token_mask)
        self.delta = float(delta)

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        pc, rc = _cells(x, self.context, self.token_mask)
        k = pc.own.shape[-1]
        chosen = anchor_loss(pc.chosen.reshape(-1), rc.chosen.reshape(-1), x.beta, self.delta).view(-1, k)
        own = anchor_loss(pc.own.reshape(-1), rc.own.reshape(-1), x.beta, self.delta).view(-1, k)
        return self.edit_mean(chosen + own, x), {}


class VCDist(_PairTerm):
    """IC-VCO's visual contrastive distillation: the single-image pairs (over the edited span) pulled toward the
    two-image context's, where that teacher is right and more sure (``misp.losses.distillation_loss``).

    The released code averages the gated BCE over the active pairs of the batch; here each example gets its
    active pairs' sum times ``B / (active pairs in the batch)``, so the batch mean the module takes is that
    same value (0 when no pair is active).

    Args:
        weight: the term's multiplier (IC-VCO's 0.4).
        threshold: the teacher's correctness gate on ``sigmoid(beta l_teacher)``.
        token_mask: the student (single-image) pairs over the edited span only, as IC-VCO trains them.
    """

    def __init__(self, weight: float = 1.0, threshold: float = 0.5, token_mask: bool = True) -> None:
        super().__init__(weight, "single", token_mask)
        self.threshold = float(threshold)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "vcdist"

    @property
    def needs_in_context(self) -> bool:  # type: ignore[override]
        return True

    def __call__(self, x: TermInputs) -> tuple[Tensor, dict[str, Tensor]]:
        student = torch.stack(self.logits(x), dim=-1)  # [B, K, 2]
        pc, rc = _cells(x, "in_context", False)
        teacher = torch.stack(response_pair_logits(pc.chosen, pc.swapped, pc.own, pc.chosen_edit,
                                                   rc.chosen, rc.swapped, rc.own, rc.chosen_edit), dim=-1)
        bce, active = distillation_loss(student, teacher, x.beta, self.threshold)
        n_active = active.sum().clamp_min(1).to(bce.dtype)
        losses = bce.flatten(1).sum(-1) * (bce.shape[0] / n_active)
        return losses, {"vcdist/active_rate": active.float().mean()}


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
    "CellTokenLogps",
    "Cooling",
    "EditSpans",
    "ImageRanking",
    "InContextPairs",
    "LossTerm",
    "PairAnchors",
    "PairMargin",
    "PairedLogps",
    "PairedResponses",
    "PlackettLuce",
    "ProposalFit",
    "ResponseCells",
    "ResponsePairs",
    "VCDist",
    "SequenceLogps",
    "TermInputs",
    "TextDPO",
    "sum_terms",
    "uses_negatives",
    "weighted_term_losses",
]
