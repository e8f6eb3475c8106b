"""A preference objective: one beta and a weighted sum of named terms (``misp.dpo.terms``).

Every method of method.md is a set of named terms and a negative source, written out in its file
(``configs/methods/``, ``misp.methods``) and built as a ``misp.dpo.method.Method``, whose ``objective`` this is:

| method                 | terms                                                       | source   |
| ---------------------- | ----------------------------------------------------------- | -------- |
| DPO, CLIP-DPO          | TextDPO                                                     | none     |
| mDPO                   | TextDPO + PlackettLuce (K = 1: L_cond) + Anchor              | crop     |
| CHiP-style             | TextDPO + PlackettLuce (K = 1)                               | noise    |
| random multi-negative  | TextDPO + PlackettLuce                                       | random   |
| MISP-DPO               | PlackettLuce(importance_sampling) + lambda TextDPO + ProposalFit | sae  |

``PreferenceObjective.preset("misp_dpo")`` is a method file's objective in code (notebooks, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from misp.dpo.terms import (
    EditSpans,
    InContextPairs,
    LossTerm,
    PairedResponses,
    SequenceLogps,
    TermInputs,
    TextDPO,
    sum_terms,
    uses_negatives,
    weighted_term_losses,
)
from misp.losses import image_advantages


@dataclass
class PreferenceObjective:
    """What a preference run optimises: the sum of ``terms``, all at one ``beta``."""

    beta: float = 0.5
    """KL-penalty strength of every term (0.1 for DPO/mDPO, 0.5 for the multi-negative methods)."""
    terms: list[LossTerm] = field(default_factory=lambda: [TextDPO()])
    """The weighted terms summed into the loss, e.g. [TextDPO, PlackettLuce, Anchor] for mDPO."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"objective.beta must be > 0, got {self.beta}")
        if not self.terms:
            raise ValueError("objective.terms is empty: name at least one term (e.g. misp.dpo.terms.TextDPO)")
        names = [t.name for t in self.terms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"objective.terms names {repeated} more than once; give each term once with its weight")

    @classmethod
    def preset(cls, method: str, beta: float | None = None) -> PreferenceObjective:
        """The objective of method file ``configs/methods/<method>.yaml`` (at its beta unless given)."""
        from misp.dpo.method import Method

        return Method.preset(method, beta).objective

    @property
    def uses_negatives(self) -> bool:
        return uses_negatives(self.terms)

    @property
    def uses_edit_spans(self) -> bool:
        """A term reads per-token log-probs over edited spans (``token_mask``), so the step computes them."""
        return any(t.needs_edit_spans for t in self.terms)

    @property
    def uses_in_context(self) -> bool:
        """A term reads the pairs in IC-VCO's two-image context, so the data builds those rows."""
        return any(t.needs_in_context for t in self.terms)

    @property
    def uses_proposal(self) -> bool:
        """A learnable q_phi is read (importance sampling over its draws) or trained."""
        return any(t.trains_proposal for t in self.terms)


def preference_terms(
    objective: PreferenceObjective,
    policy: SequenceLogps,
    reference: SequenceLogps,
    log_q: Tensor | None = None,
    log_q_phi: Tensor | None = None,
    paired: PairedResponses | None = None,
    spans: EditSpans | None = None,
    in_context: InContextPairs | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each term's weighted per-example losses ``[B]`` by term name, and the metrics of the terms that ran.

    ``sum_terms(losses).mean()`` is :func:`preference_loss`; the terms apart serve diagnostics that need
    each one's gradient (``MISPDPOModule(diagnostics_every_n_steps=...)``). ``paired``, ``spans`` and
    ``in_context`` are the response-pair inputs, for a source that gives them (``misp.dpo.pairs``).
    """
    if objective.uses_negatives and policy.negatives.shape[-1] == 0:
        raise ValueError(f"objective terms {[t.name for t in objective.terms]} need negatives; the data gave none")
    advantages = None
    if policy.negatives.shape[-1]:
        advantages = image_advantages(policy.chosen, policy.negatives, reference.chosen, reference.negatives, objective.beta)
    inputs = TermInputs(policy, reference, objective.beta, advantages, log_q, log_q_phi, paired, spans, in_context)
    return weighted_term_losses(objective.terms, inputs)


def preference_loss(
    objective: PreferenceObjective,
    policy: SequenceLogps,
    reference: SequenceLogps,
    log_q: Tensor | None = None,
    log_q_phi: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the batch and the metrics of the terms that ran (TRL's names where TRL has them)."""
    losses, metrics = preference_terms(objective, policy, reference, log_q, log_q_phi)
    return sum_terms(losses).mean(), metrics


__all__ = ["PreferenceObjective", "SequenceLogps", "preference_loss", "preference_terms", "sum_terms"]
