"""Preference-optimisation losses as pure functions over per-sequence log-probabilities.

Every loss takes summed response log-probabilities (see :mod:`misp.logprobs`) of the policy and of the
frozen reference model and returns one value per example (shape ``[B]``); the LightningModule decides
how to reduce and weight them. Formulas and notation follow ``docs/method.md`` sections 1 and 4.5:
``r = logp_policy - logp_ref`` is the implicit reward without beta.

Numerical stability: everything is written with ``logsigmoid``, ``softplus`` and ``logsumexp``, so the
values and gradients stay finite even when advantages reach ``|a| = 1e4`` (which happens in bf16 runs
with a drifting policy). Nothing here exponentiates a raw advantage.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "anchor_loss",
    "cool_gradient",
    "cooling_weights",
    "distillation_loss",
    "dpo_loss",
    "image_advantages",
    "importance_weight_stats",
    "masked_logps",
    "plackett_luce_loss",
    "proposal_loss",
    "ranking_loss",
    "response_pair_logits",
]


Estimator = Literal["plugin", "jackknife"]
"""How the importance-sampled image loss estimates ``log(1 + Z)`` from ``Z^`` (``plackett_luce_loss``)."""
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")


def _check_same_shape(name: str, ref_shape: torch.Size, **tensors: Tensor) -> None:
    for key, t in tensors.items():
        if t.shape != ref_shape:
            raise ValueError(f"{name}: {key} has shape {tuple(t.shape)}, expected {tuple(ref_shape)}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss (Rafailov et al.), ``L_text`` of method.md section 1.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of the chosen responses.
        policy_rejected_logps: ``[B]`` policy log-probs of the rejected responses.
        ref_chosen_logps: ``[B]`` reference log-probs of the chosen responses.
        ref_rejected_logps: ``[B]`` reference log-probs of the rejected responses.
        beta: KL-penalty strength, > 0.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``:
        ``losses = -logsigmoid(beta * (r_chosen - r_rejected))`` and the detached rewards ``beta * r``.
    """
    _check_beta(beta)
    shape = policy_chosen_logps.shape
    _check_same_shape(
        "dpo_loss",
        shape,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen_r = policy_chosen_logps - ref_chosen_logps
    rejected_r = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_r - rejected_r))
    return losses, beta * chosen_r.detach(), beta * rejected_r.detach()


def image_advantages(
    policy_pos_logps: Tensor,
    policy_neg_logps: Tensor,
    ref_pos_logps: Tensor,
    ref_neg_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-negative image advantages ``a_i = beta * [r(y_p|x,m_i) - r(y_p|x,m_p)]``.

    A positive ``a_i`` means the policy (relative to the reference) prefers the chosen response under the
    negative image ``m_i`` more than under the true image: the failure the image losses penalise.

    Args:
        policy_pos_logps: ``[B]`` policy log-probs of ``y_p`` under the positive image.
        policy_neg_logps: ``[B, K]`` policy log-probs of ``y_p`` under each negative image.
        ref_pos_logps: ``[B]`` reference log-probs of ``y_p`` under the positive image.
        ref_neg_logps: ``[B, K]`` reference log-probs of ``y_p`` under each negative image.
        beta: KL-penalty strength, > 0.

    Returns:
        ``[B, K]`` advantages (differentiable).
    """
    _check_beta(beta)
    if policy_neg_logps.dim() != 2:
        raise ValueError(
            f"image_advantages: negatives must be [B, K], got shape {tuple(policy_neg_logps.shape)}"
        )
    b = policy_neg_logps.shape[0]
    _check_same_shape(
        "image_advantages", torch.Size([b]), policy_pos_logps=policy_pos_logps, ref_pos_logps=ref_pos_logps
    )
    _check_same_shape("image_advantages", policy_neg_logps.shape, ref_neg_logps=ref_neg_logps)
    pos_r = policy_pos_logps - ref_pos_logps
    neg_r = policy_neg_logps - ref_neg_logps
    return beta * (neg_r - pos_r.unsqueeze(-1))


def _is_log_weights(a: Tensor, log_q: Tensor | None) -> Tensor:
    """``log w_k = a_k - log q(i_k)`` (or ``a_k`` without a proposal)."""
    return a if log_q is None else a - log_q


def plackett_luce_loss(
    policy_pos_logps: Tensor,
    policy_neg_logps: Tensor,
    ref_pos_logps: Tensor,
    ref_neg_logps: Tensor,
    beta: float,
    log_q: Tensor | None = None,
    estimator: Estimator = "plugin",
) -> Tensor:
    """Plackett-Luce multi-negative image loss ``L_img`` and its importance-sampled form ``L_img^IS``.

    Without ``log_q`` (``PlackettLuce(importance_sampling=false)``, or a fixed negative set S)::

        L_img(S) = softplus(LSE_{i in S} a_i) = log(1 + sum_i exp(a_i))

    the negative log-probability that the positive image ranks first among ``{m_p} U S`` under
    Plackett-Luce scores ``s = beta * r``. With ``K = 1`` it is mDPO's conditional loss
    ``-logsigmoid(beta [r(y_p|m_p) - r(y_p|m_1)])``.

    With ``log_q`` (draws ``i_1..i_K`` made with replacement from a proposal q over a pool)::

        L_img^IS = softplus(LSE_k (a_{i_k} - log q(i_k) - log K)) = log(1 + Z^),
        Z^ = (1/K) sum_k exp(a_{i_k}) / q(i_k)

    where ``Z^`` is the unbiased importance-sampling estimate of ``Z = sum_{i in pool} exp(a_i)``; the
    loss is consistent for the full-pool ``L_img`` as K grows (method.md section 4.5). Repeated draws
    count once per draw, as the estimator requires.

    Both are computed as ``logsumexp([0, x_1, ..., x_K])``, which is ``softplus(LSE x)`` without an
    intermediate that can be ``-inf``.

    ``Z^`` is unbiased but ``log(1 + .)`` is concave, so the plug-in is biased low (Jensen; 5-30% of the
    full-pool loss under the proposals q_phi reaches, bench/README.md). ``estimator="jackknife"`` removes the
    ``O(1/K)`` term of that bias with the leave-one-out estimates ``Z^_{-j} = 1/(K-1) sum_{k != j} w_k``::

        L_img^JK = K f(Z^) - (K-1)/K sum_j f(Z^_{-j}),     f(z) = log(1 + z)

    every ``f`` of a ``logsumexp`` over ``log w``, the one of ``Z^_{-j}`` joining the draws before j and after it
    (never a difference of exponentials).
    Unlike the plug-in, one draw set's value may fall below 0; its mean is what lies nearer the full-pool loss.
    It needs ``log_q`` (without it the loss over the drawn set is exact) and K >= 2 (one draw has no
    leave-one-out estimate; there is no silent fall-back to the plug-in, so a run labelled jackknife is one).

    Args:
        policy_pos_logps: ``[B]`` policy log-probs of ``y_p`` under the positive image.
        policy_neg_logps: ``[B, K]`` policy log-probs of ``y_p`` under each drawn negative image.
        ref_pos_logps: ``[B]`` reference log-probs of ``y_p`` under the positive image.
        ref_neg_logps: ``[B, K]`` reference log-probs of ``y_p`` under each drawn negative image.
        beta: KL-penalty strength, > 0.
        log_q: optional ``[B, K]`` proposal log-probabilities of the draws; gives ``L_img^IS``.
        estimator: ``"plugin"`` (``log(1 + Z^)``) or ``"jackknife"`` (its bias-corrected form, needs ``log_q``
            and K >= 2), for the importance-sampled loss.

    Returns:
        ``[B]`` losses.

    Raises:
        ValueError: an unknown estimator, or the jackknife without ``log_q`` or with fewer than 2 draws.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"plackett_luce_loss: unknown estimator {estimator!r}; choose from {ESTIMATORS}")
    a = image_advantages(policy_pos_logps, policy_neg_logps, ref_pos_logps, ref_neg_logps, beta)
    if log_q is not None:
        _check_same_shape("plackett_luce_loss", a.shape, log_q=log_q)
    if estimator == "jackknife":
        if log_q is None:
            raise ValueError("plackett_luce_loss: the jackknife corrects the importance-sampled estimate and needs log_q")
        return _jackknife_loss(_is_log_weights(a, log_q))
    x = _is_log_weights(a, log_q)
    if log_q is not None:
        k = a.new_full(a.shape[:1], a.shape[1])
        x = x - k.clamp_min(1).log().unsqueeze(-1)
    zeros = x.new_zeros(x.shape[0], 1)
    return torch.logsumexp(torch.cat([zeros, x], dim=-1), dim=-1)


def _log1p_exp(t: Tensor) -> Tensor:
    """``log(1 + exp(t))`` exactly (``F.softplus`` returns ``t`` itself above its threshold), finite at ``t = -inf``."""
    return torch.logaddexp(torch.zeros_like(t), t)


def _jackknife_loss(log_w: Tensor) -> Tensor:
    """``K f(Z^) - (K-1)/K sum_j f(Z^_{-j})`` from the draws' log weights ``log w [B, K]`` (``f = log(1 + .)``)."""
    k = log_w.shape[-1]
    if k < 2:
        raise ValueError(
            f"plackett_luce_loss: the jackknife leaves one draw out and needs K >= 2 draws, got K={k}"
        )
    log_z = torch.logsumexp(log_w, dim=-1) - math.log(k)
    # Z^_{-j} from the draws before j and those after it (prefix and suffix logcumsumexp), O(K): subtracting
    # w_j from the sum would cancel catastrophically when one weight dominates.
    none = log_w.new_full((*log_w.shape[:-1], 1), float("-inf"))
    before = torch.cat([none, torch.logcumsumexp(log_w, dim=-1)[..., :-1]], dim=-1)
    after = torch.cat([torch.logcumsumexp(log_w.flip(-1), dim=-1).flip(-1)[..., 1:], none], dim=-1)
    log_z_minus = torch.logaddexp(before, after) - math.log(k - 1)  # [B, K]
    return k * _log1p_exp(log_z) - (k - 1) / k * _log1p_exp(log_z_minus).sum(-1)


def anchor_loss(
    policy_chosen_logps: Tensor, ref_chosen_logps: Tensor, beta: float, delta: float = 0.0
) -> Tensor:
    """Anchored preference loss (mDPO's AncPO): ``L_anc = -logsigmoid(beta * r(y_p|x,m_p) - delta)``.

    Args:
        policy_chosen_logps: ``[B]`` policy log-probs of the chosen response under the positive image.
        ref_chosen_logps: ``[B]`` reference log-probs of the same.
        beta: KL-penalty strength, > 0.
        delta: anchor offset; 0 keeps the chosen reward from going negative.

    Returns:
        ``[B]`` losses.
    """
    _check_beta(beta)
    _check_same_shape("anchor_loss", policy_chosen_logps.shape, ref_chosen_logps=ref_chosen_logps)
    return -F.logsigmoid(beta * (policy_chosen_logps - ref_chosen_logps) - delta)


@torch.no_grad()
def importance_weight_stats(a: Tensor, log_q: Tensor | None) -> tuple[Tensor, Tensor]:
    """Effective sample size and largest normalised weight of the importance weights ``w_k = exp(a_k)/q(i_k)``.

    Computed in log space so huge advantages cannot overflow::

        ESS     = (sum w)^2 / sum w^2 = exp(2 LSE(log w) - LSE(2 log w))     in [1, K]
        max w~  = max_k w_k / sum w   = exp(max log w - LSE(log w))           in [1/K, 1]

    ESS near K means the proposal matches the target ``p_theta(i) ~ exp(a_i)`` well; ESS near 1 means one
    draw carries the whole estimate.

    Args:
        a: ``[B, K]`` image advantages of the draws.
        log_q: ``[B, K]`` proposal log-probabilities of the draws, or None for equal proposal weights.

    Returns:
        ``(ess, max_normalised_weight)``, each ``[B]``, detached. Rows without a real draw give 0 and 0.
    """
    if a.dim() != 2:
        raise ValueError(f"importance_weight_stats: a must be [B, K], got shape {tuple(a.shape)}")
    if log_q is not None:
        _check_same_shape("importance_weight_stats", a.shape, log_q=log_q)
    log_w = _is_log_weights(a, log_q)
    lse = torch.logsumexp(log_w, dim=-1)
    empty = torch.isneginf(lse)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, dim=-1))
    max_w = torch.exp(log_w.amax(dim=-1) - lse)
    return ess.masked_fill(empty, 0.0), max_w.masked_fill(empty, 0.0)


def proposal_loss(a_detached: Tensor, log_q_draw: Tensor, log_q_phi: Tensor) -> Tensor:
    """Self-normalised IS estimate of ``KL(p_theta || q_phi)`` (up to a phi-independent constant).

    The target is the model's own preference over the example's pool, ``p_theta(i) = exp(a_i) / Z``,
    the proposal that minimises the variance of ``Z^`` (method.md 4.4). Expanding the divergence::

        KL(p_theta || q_phi) = sum_i p_theta(i) log p_theta(i)  -  sum_i p_theta(i) log q_phi(i)

    the first term does not depend on phi. The second is an expectation under p_theta, which we cannot
    sample from, so we rewrite it under the proposal ``q0`` the draws actually came from (the frozen
    q_phi of the epoch start, log-probs ``log_q_draw``)::

        sum_i p_theta(i) log q_phi(i) = E_{i ~ q0}[ p_theta(i) / q0(i) * log q_phi(i) ]

    and with draws ``i_1..i_K ~ q0`` the unknown normaliser Z is replaced by its IS estimate, which
    self-normalises the weights::

        w_k = exp(a_{i_k}) / q0(i_k),   wbar_k = w_k / sum_j w_j = softmax_k(a_{i_k} - log q0(i_k))
        loss = - sum_k wbar_k * log q_phi(i_k)

    ``wbar`` is detached (it is a fixed weighting, not a function of phi), so the gradient is
    ``-sum_k wbar_k grad log q_phi(i_k)``: a weighted maximum-likelihood step that moves q_phi towards
    p_theta. The estimate is biased for finite K (self-normalisation) but consistent; its minimiser over
    an unconstrained q is p_theta itself.

    Args:
        a_detached: ``[B, K]`` image advantages of the draws (detached here regardless).
        log_q_draw: ``[B, K]`` log-probabilities of the draws under the proposal that made them.
        log_q_phi: ``[B, K]`` log-probabilities of the same draws under the current (trainable) q_phi.

    Returns:
        ``[B]`` losses; rows without a real draw give 0.
    """
    if a_detached.dim() != 2:
        raise ValueError(f"proposal_loss: a must be [B, K], got shape {tuple(a_detached.shape)}")
    _check_same_shape("proposal_loss", a_detached.shape, log_q_draw=log_q_draw, log_q_phi=log_q_phi)
    log_w = _is_log_weights(a_detached.detach(), log_q_draw.detach())
    lse = torch.logsumexp(log_w, dim=-1, keepdim=True)
    # A fully padded row has lse = -inf; give it zero weights instead of NaN.
    wbar = torch.where(torch.isneginf(lse), torch.zeros_like(log_w), torch.exp(log_w - lse))
    return -(wbar * log_q_phi).sum(dim=-1)


# --- the anchors' objectives (method.md section 9): SymMPO, IC-VCO, LPOI, and CW-DPO's cooling weight ---------


def masked_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """A response's log-probability summed over the tokens ``mask`` selects (IC-VCO's edited span).

    Args:
        token_logps: ``[..., T]`` per-token log-probabilities (any value where ``mask`` is False, padding too).
        mask: ``[..., T]`` bool, True on the tokens that count.

    Returns:
        ``[...]`` sums; a row whose mask selects nothing gives 0.
    """
    if mask.shape != token_logps.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"masked_logps: mask must be a bool tensor of shape {tuple(token_logps.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return token_logps.masked_fill(~mask, 0.0).sum(-1)


def response_pair_logits(
    chosen: Tensor,
    swapped: Tensor,
    own: Tensor,
    chosen_edit: Tensor,
    ref_chosen: Tensor,
    ref_swapped: Tensor,
    ref_own: Tensor,
    ref_chosen_edit: Tensor,
) -> tuple[Tensor, Tensor]:
    """The two response pairs an edited image ``m_i`` with its own correct response ``y_i`` makes (no beta).

    Each pair shares its context (the image, or IC-VCO's two-image context), so the context's partition
    function cancels from the pair, which a single-response image term ``a_i`` cannot do::

        l_p = r(y_p | c_p) - r(y_i | c_p)      y_p over y_i under the positive's context
        l_i = r(y_i | c_i) - r(y_p | c_i)      y_i over y_p under the edit's context

    SymMPO's ``logits_1`` and ``logits_2``; IC-VCO's two ``dpo_loss`` logits per example. All arguments
    have one shape (``[B, K]``: K edits per example), policy first, then the reference.

    Args:
        chosen: log p(y_p | c_p).
        swapped: log p(y_i | c_p).
        own: log p(y_i | c_i).
        chosen_edit: log p(y_p | c_i).
        ref_chosen, ref_swapped, ref_own, ref_chosen_edit: the reference model's same four.

    Returns:
        ``(l_p, l_i)``, each of the arguments' shape, differentiable.
    """
    _check_same_shape(
        "response_pair_logits", chosen.shape, swapped=swapped, own=own, chosen_edit=chosen_edit,
        ref_chosen=ref_chosen, ref_swapped=ref_swapped, ref_own=ref_own, ref_chosen_edit=ref_chosen_edit,
    )
    l_p = (chosen - swapped) - (ref_chosen - ref_swapped)
    l_i = (own - chosen_edit) - (ref_own - ref_chosen_edit)
    return l_p, l_i


def distillation_loss(student: Tensor, teacher: Tensor, beta: float, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """IC-VCO's VCDist: a gated binary cross-entropy pulling the single-image pair toward the in-context one.

    With ``s = beta * student`` and the target ``p = sigmoid(beta * teacher)`` (stop-gradient)::

        BCE(sigmoid(s), p) = p * softplus(-s) + (1 - p) * softplus(s)

    counted only where the teacher is right (``p > threshold``) and the student is less sure of it
    (``sigmoid(s) < p``). The released code's ``F.binary_cross_entropy`` on probabilities is the same value
    while ``|s| < 100``; the logit form stays finite beyond.

    Args:
        student: ``[...]`` pair logits of the single-image branch (:func:`response_pair_logits`, no beta).
        teacher: ``[...]`` the same pairs' logits in the two-image context (detached here).
        beta: KL-penalty strength, > 0.
        threshold: the teacher's correctness gate on ``p``.

    Returns:
        ``(losses, active)``: per-pair BCE ``[...]`` (0 where the gate is shut) and the gate, a bool mask.
    """
    _check_beta(beta)
    _check_same_shape("distillation_loss", student.shape, teacher=teacher)
    s = beta * student
    p = torch.sigmoid(beta * teacher.detach())
    active = (p > threshold) & (torch.sigmoid(s.detach()) < p)
    bce = p * F.softplus(-s) + (1 - p) * F.softplus(s)
    return bce.masked_fill(~active, 0.0), active


def ranking_loss(
    policy_pos_logps: Tensor,
    policy_neg_logps: Tensor,
    ref_pos_logps: Tensor,
    ref_neg_logps: Tensor,
    beta: float,
) -> Tensor:
    """LPOI's listwise loss: the Plackett-Luce likelihood of the full ranking ``m_p > m_1 > ... > m_K``.

    With scores ``s_0 = beta r(y_p|x,m_p)`` and ``s_k = beta r(y_p|x,m_k)`` for the K negatives in their
    ranked order (occlusion level k: more of the object hidden as k grows)::

        L_list = sum_{k=0}^{K-1} [ LSE_{j >= k} s_j - s_k ]

    Its k = 0 term is ``L_img`` over all K negatives (``softplus(LSE_i a_i)``), so with K = 1 it is mDPO's
    conditional loss. Computed with a reversed ``logcumsumexp``, never exponentiating a score.

    Args:
        policy_pos_logps: ``[B]`` policy log-probs of ``y_p`` under the positive image.
        policy_neg_logps: ``[B, K]`` policy log-probs of ``y_p`` under each negative, in rank order.
        ref_pos_logps: ``[B]`` reference log-probs of ``y_p`` under the positive image.
        ref_neg_logps: ``[B, K]`` reference log-probs, same order.
        beta: KL-penalty strength, > 0.

    Returns:
        ``[B]`` losses.
    """
    _check_beta(beta)
    if policy_neg_logps.dim() != 2:
        raise ValueError(f"ranking_loss: negatives must be [B, K], got shape {tuple(policy_neg_logps.shape)}")
    b = policy_neg_logps.shape[0]
    _check_same_shape("ranking_loss", torch.Size([b]), policy_pos_logps=policy_pos_logps, ref_pos_logps=ref_pos_logps)
    _check_same_shape("ranking_loss", policy_neg_logps.shape, ref_neg_logps=ref_neg_logps)
    pos = (policy_pos_logps - ref_pos_logps).unsqueeze(-1)
    s = beta * torch.cat([pos, policy_neg_logps - ref_neg_logps], dim=-1)
    tail_lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)  # [B, K+1]: LSE_{j >= k} s_j
    return (tail_lse - s)[:, :-1].sum(-1)


@torch.no_grad()
def cooling_weights(a: Tensor, floor: float, tau: float) -> Tensor:
    """CW-DPO's cooling weight on each negative, read off its image advantage: ``w = sigmoid((a - floor) / tau)``.

    A negative the model has solved (``a_i`` far below ``floor``) gets a weight near 0 and stops pushing;
    one it still confuses with the positive (``a_i`` near or above 0) keeps a weight near 1. Detached: the
    weight scales a gradient, it is not itself trained.

    Args:
        a: ``[...]`` image advantages ``beta [r(y_p|m_i) - r(y_p|m_p)]``.
        floor: the advantage at which the weight is 1/2.
        tau: the width of the transition, > 0.

    Returns:
        ``[...]`` weights in (0, 1).
    """
    if not tau > 0:
        raise ValueError(f"cooling tau must be > 0, got {tau}")
    return torch.sigmoid((a.detach() - floor) / tau)


def cool_gradient(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` with its value unchanged and its gradient multiplied by ``weight`` (``w x + (1 - w) sg(x)``).

    Cooling a negative's log-probability this way leaves every loss value, and the gradient every other
    negative receives, exactly as without cooling; only the cooled negative's own push shrinks.
    """
    _check_same_shape("cool_gradient", x.shape, weight=weight)
    weight = weight.detach().to(x.dtype)
    return weight * x + (1 - weight) * x.detach()
