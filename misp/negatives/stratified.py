"""Stratified draws: one of each record's K negatives from its target stratum, the rest from the others.

misp's own method needs the edits that insert or remove a record's co-occurrence partner among the drawn
negatives (docs/results-shapes_edits.md: drawn by q_phi alone they came up in about a quarter of the partner
records' epochs, and the response-pair term that should ground the partner barely fired). Forcing one such
draw changes the design, so the importance weights must change with it to keep the image term's estimate of
the pool's partition function ``Z = sum_i exp(a_i)`` unbiased. With the record's M negatives split into the
target stratum A and the rest B, ``q_A = q / q(A)`` on A and ``q_B = q / q(B)`` on B, one draw ``j ~ q_A``
and K-1 draws ``b ~ q_B``::

    Z^ = exp(a_j) / q_A(j) + 1/(K-1) sum_b exp(a_b) / q_B(b)

is unbiased for ``Z`` (each part is unbiased for its stratum's sum). The image term computes
``Z^ = (1/K) sum_k exp(a_k - log q_k)``, so the draws carry the effective log-probabilities
``log q_A(j) - log K`` and ``log q_B(b) + log((K-1)/K)`` in place of ``log q``; the term, q_phi's
self-normalised fit and the IS diagnostics read them unchanged. A record whose A or B is empty (no target
among its negatives, or nothing else), and any record when K = 1, draws from q as ``draw_negatives`` does,
with its plain log q.

Draws stay a pure function of (seed, epoch, record id): the stratum draw takes the record's first uniform,
the others the next K-1, the same uniforms ``draw_negatives`` would use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from misp.negatives.proposal import _uniforms, draw_negatives, gather_log_q, inverse_cdf

NEG_INF = float("-inf")


def draw_stratified(
    log_q: Tensor, stratum: Tensor, k: int, seed: int, epoch: int, record_ids: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """K draws per record, the first from its target stratum, with the log-probabilities the IS estimate needs.

    Args:
        log_q: ``[R, M]`` proposal log-probabilities (``-inf`` for invalid candidates).
        stratum: ``[R, M]`` bool, True on each record's target negatives (stratum A).
        k: draws per record, >= 1.
        seed: run seed.
        epoch: epoch number.
        record_ids: the R record ids, aligned with the rows.

    Returns:
        ``(index [R, K] long, log_q_eff [R, K] float64)``: the draws, and the effective log-probabilities
        that make ``(1/K) sum_k exp(a_k - log_q_eff_k)`` the stratified estimate of ``Z`` (module docstring);
        plain ``log q`` on rows drawn without strata.
    """
    if stratum.shape != log_q.shape or stratum.dtype != torch.bool:
        raise ValueError(f"stratum must be a bool tensor of log_q's shape {tuple(log_q.shape)}, got "
                         f"{stratum.dtype} {tuple(stratum.shape)}")
    index = draw_negatives(log_q, k, seed, epoch, record_ids)
    log_q_eff = gather_log_q(log_q.to(torch.float64), index)
    if k < 2 or log_q.shape[0] == 0:
        return index, log_q_eff
    q = log_q.detach().to(torch.float64)
    possible = torch.isfinite(q)
    in_a, in_b = stratum & possible, ~stratum & possible
    rows = in_a.any(1) & in_b.any(1)
    if not bool(rows.any()):
        return index, log_q_eff
    q, in_a, in_b = q[rows], in_a[rows], in_b[rows]
    log_qa = torch.where(in_a, q, NEG_INF)
    log_qa = log_qa - torch.logsumexp(log_qa, 1, keepdim=True)
    log_qb = torch.where(in_b, q, NEG_INF)
    log_qb = log_qb - torch.logsumexp(log_qb, 1, keepdim=True)
    u = torch.from_numpy(_uniforms(seed, epoch, [r for r, keep in zip(record_ids, rows.tolist(), strict=True) if keep], k))
    drawn = torch.cat([inverse_cdf(log_qa, u[:, :1]), inverse_cdf(log_qb, u[:, 1:])], 1).to(index.device)
    eff = torch.cat([gather_log_q(log_qa, drawn[:, :1]) - math.log(k),
                     gather_log_q(log_qb, drawn[:, 1:]) + math.log((k - 1) / k)], 1)
    index[rows.to(index.device)] = drawn
    log_q_eff[rows.to(log_q_eff.device)] = eff.to(log_q_eff.device)
    return index, log_q_eff
