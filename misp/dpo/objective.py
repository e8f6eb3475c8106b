"""The preference objectives of method.md section 1, composed from the pure losses in misp.losses.

| loss | total                                   | used by                                   |
| ---- | --------------------------------------- | ----------------------------------------- |
| dpo  | L_text                                  | DPO, CLIP-DPO                             |
| mdpo | L_text + L_img(S)                       | mDPO (+ anchor), CHiP-style, random multi-negative |
| misp | L_img^IS(S~) + lambda_text * L_text     | MISP-DPO (``is_correction: false``: plain L_img) |

``anchor: true`` adds L_anc to any of them. With K = 1, L_img(S) is mDPO's conditional loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from misp.losses import anchor_loss, dpo_loss, image_advantages, importance_weight_stats, plackett_luce_loss


@dataclass
class PreferenceObjective:
    """Which objective to optimise and its weights."""

    loss: Literal["dpo", "mdpo", "misp"] = "misp"
    """dpo: text DPO only; mdpo: text + image (Plackett-Luce over the drawn negatives); misp: the
    importance-sampled image loss plus lambda_text times the text loss."""
    beta: float = 0.5
    """KL-penalty strength of every term (0.1 for DPO/mDPO, 0.5 for the multi-negative methods)."""
    lambda_text: float = 1.0
    """misp: weight of the text DPO term."""
    anchor: bool = False
    """Add mDPO's anchor loss -log sigma(beta * r(y_p|x,m_p) - delta) (on for mDPO)."""
    delta: float = 0.0
    """Anchor margin."""
    is_correction: bool = True
    """misp: subtract log q and log K inside the LSE (method.md 4.5); false is the "no IS" ablation."""

    def __post_init__(self) -> None:
        if self.loss not in ("dpo", "mdpo", "misp"):
            raise ValueError(f"objective.loss must be dpo, mdpo or misp, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"objective.beta must be > 0, got {self.beta}")

    @property
    def uses_negatives(self) -> bool:
        return self.loss != "dpo"


@dataclass
class SequenceLogps:
    """Summed response log-probs of one step, policy or reference."""

    chosen: torch.Tensor
    """[B] log p(y_p | x, m_p)."""
    rejected: torch.Tensor
    """[B] log p(y_n | x, m_p)."""
    negatives: torch.Tensor
    """[B, K] log p(y_p | x, m_i) for each drawn negative image (K may be 0)."""


def preference_loss(
    objective: PreferenceObjective,
    policy: SequenceLogps,
    reference: SequenceLogps,
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and the logged metrics (TRL names where TRL has them)."""
    o = objective
    text, chosen_rewards, rejected_rewards = dpo_loss(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected, o.beta
    )
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
        "loss/text": text.detach().mean(),
    }
    total = text if o.loss != "misp" else o.lambda_text * text
    if o.uses_negatives:
        if policy.negatives.shape[1] == 0:
            raise ValueError(f"objective.loss={o.loss!r} needs negatives; the data source gave none")
        use_q = log_q if (o.loss == "misp" and o.is_correction) else None
        image = plackett_luce_loss(
            policy.chosen, policy.negatives, reference.chosen, reference.negatives, o.beta, log_q=use_q
        )
        total = total + image
        a = image_advantages(policy.chosen, policy.negatives, reference.chosen, reference.negatives, o.beta).detach()
        metrics |= {
            "loss/image": image.detach().mean(),
            "rewards/img_pos": chosen_rewards.mean(),
            "rewards/img_neg": (o.beta * (policy.negatives - reference.negatives)).detach().mean(),
            "img/accuracies": (a < 0).all(dim=1).float().mean(),
            "logps/negatives": policy.negatives.detach().mean(),
        }
        if log_q is not None:
            ess, max_weight = importance_weight_stats(a, log_q)
            metrics |= {"is/ess": ess.mean(), "is/max_weight": max_weight.mean()}
    if o.anchor:
        anchor = anchor_loss(policy.chosen, reference.chosen, o.beta, o.delta)
        total = total + anchor
        metrics["loss/anchor"] = anchor.detach().mean()
    return total.mean(), metrics
