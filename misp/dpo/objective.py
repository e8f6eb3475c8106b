"""A preference objective: one beta and a weighted sum of named terms (``misp.dpo.terms``).

Every method of method.md is a list of terms, written out in its config (configs/shapes/*.yaml):

| method                 | terms                                                       | source   |
| ---------------------- | ----------------------------------------------------------- | -------- |
| DPO, CLIP-DPO          | TextDPO                                                     | none     |
| mDPO                   | TextDPO + PlackettLuce (K = 1: L_cond) + Anchor              | crop     |
| CHiP-style             | TextDPO + PlackettLuce (K = 1)                               | noise    |
| random multi-negative  | TextDPO + PlackettLuce                                       | random   |
| MISP-DPO               | PlackettLuce(importance_sampling) + lambda TextDPO + ProposalFit | sae  |

``preset`` builds the same lists in code (notebooks, tests, ``PreferenceObjective.preset("misp")``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from misp.dpo.terms import (
    Anchor,
    LossTerm,
    PlackettLuce,
    ProposalFit,
    SequenceLogps,
    TermInputs,
    TextDPO,
    sum_terms,
    uses_negatives,
    weighted_term_losses,
)
from misp.losses import image_advantages

PRESETS = ("dpo", "mdpo", "chip", "random_neg", "misp")
"""Names of the methods ``PreferenceObjective.preset`` builds."""


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
    def preset(cls, method: str, beta: float | None = None, lambda_text: float = 1.0) -> PreferenceObjective:
        """The objective of a method of method.md, at its default beta unless given."""
        presets = {
            "dpo": (0.1, [TextDPO()]),
            "mdpo": (0.1, [TextDPO(), PlackettLuce(), Anchor()]),
            "chip": (0.1, [TextDPO(), PlackettLuce()]),
            "random_neg": (0.5, [TextDPO(), PlackettLuce()]),
            "misp": (0.5, [PlackettLuce(importance_sampling=True), TextDPO(weight=lambda_text), ProposalFit()]),
        }
        if method not in presets:
            raise ValueError(f"unknown method {method!r}; presets are {list(presets)}")
        default_beta, terms = presets[method]
        return cls(beta=default_beta if beta is None else beta, terms=terms)

    @classmethod
    def from_config(cls, config) -> PreferenceObjective:
        """From a config's ``objective`` mapping (terms as ``{class_path, init_args}``), as a YAML file has it."""
        import importlib

        config = dict(config or {})
        terms = []
        for spec in config.get("terms") or []:
            spec = dict(spec) if not isinstance(spec, LossTerm) else spec
            if isinstance(spec, LossTerm):
                terms.append(spec)
                continue
            module, _, name = str(spec["class_path"]).rpartition(".")
            terms.append(getattr(importlib.import_module(module), name)(**dict(spec.get("init_args") or {})))
        return cls(beta=config.get("beta", 0.5), **({"terms": terms} if terms else {}))

    @property
    def uses_negatives(self) -> bool:
        return uses_negatives(self.terms)

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
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each term's weighted per-example losses ``[B]`` by term name, and the metrics of the terms that ran.

    ``sum_terms(losses).mean()`` is :func:`preference_loss`; the terms apart serve diagnostics that need
    each one's gradient (``MISPDPOModule(diagnostics_every_n_steps=...)``).
    """
    if objective.uses_negatives and policy.negatives.shape[-1] == 0:
        raise ValueError(f"objective terms {[t.name for t in objective.terms]} need negatives; the data gave none")
    advantages = None
    if policy.negatives.shape[-1]:
        advantages = image_advantages(policy.chosen, policy.negatives, reference.chosen, reference.negatives, objective.beta)
    inputs = TermInputs(policy, reference, objective.beta, advantages, log_q, log_q_phi)
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


__all__ = ["PRESETS", "PreferenceObjective", "SequenceLogps", "preference_loss", "preference_terms", "sum_terms"]
