"""How much of a step's update each term of an objective contributes: gradient norms, shares and cosines.

A term's loss can be small and its gradient norm large, or the reverse; and two terms with large norms can
cancel. The share of a term in the update direction answers "what would the step lose without this term"
to first order, where norms alone do not (see :func:`gradient_shares`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import torch
from torch import Tensor


def gradient_shares(
    losses: Mapping[str, Tensor],
    params: Sequence[Tensor],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, dict]:
    """Each term's gradient norm, its share of the summed gradient, and its cosine to every other term.

    With ``g_i = d loss_i / d params`` (each ``loss_i`` already weighted as the objective sums it) and
    ``g = sum_i g_i`` the gradient of the total::

        norm_i   = ||g_i||
        share_i  = <g_i, g> / ||g||^2          (sum_i share_i = 1)
        cos_ij   = <g_i, g_j> / (||g_i|| ||g_j||)

    ``share_i`` is the length of ``g_i``'s projection on ``g`` as a fraction of ``||g||``: the part of
    the update this term supplies. Norms alone mislead when terms conflict: two terms of equal norm pulling
    in opposite directions both look large, yet the step follows neither; their shares say which wins, and
    a negative share means the term is being undone by the others. A term with no path to ``params``
    (``allow_unused``) has a zero gradient: norm 0, share 0, and cosine 0 by convention (as
    ``torch.nn.functional.cosine_similarity`` gives for a zero vector). When every gradient is zero the
    shares are undefined and returned as NaN.

    Every gradient is taken with ``retain_graph=True`` and returned by ``torch.autograd.grad``, never
    accumulated into ``.grad``: the caller's backward afterwards sees the graph and the ``.grad`` fields as
    they were. Costs one backward per term and holds every term's gradient at once (the size of the
    trainable parameters, per term).

    Args:
        losses: scalar loss of each named term, as the objective weights it; all built from ``params``'
            graph in one forward.
        params: the parameters to measure over (e.g. the policy's trainable weights).
        reduce: applied to each term's gradient of each parameter before any product, e.g. an all-reduce
            mean across data-parallel ranks, so that the numbers are those of the step's global gradient
            (every rank must then call this with the same terms and parameters, in the same order).

    Returns:
        ``{term: {"norm": Tensor, "share": Tensor, "cos": {other_term: Tensor}}}``, scalars in float64,
        detached, on the parameters' device.
    """
    if not losses:
        raise ValueError("gradient_shares needs at least one loss")
    params = list(params)
    if not params:
        raise ValueError("gradient_shares needs at least one parameter")
    names = list(losses)
    device = params[0].device
    grads: list[list[Tensor | None]] = []
    for name in names:
        loss = losses[name]
        if loss.dim() != 0:
            raise ValueError(f"gradient_shares: loss {name!r} must be a scalar, got shape {tuple(loss.shape)}")
        if loss.requires_grad:
            g = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        else:  # a constant term (e.g. every input detached): no gradient anywhere
            g = [None] * len(params)
        if reduce is not None:
            # Every rank reduces every parameter, so a gradient unused here (None) must still take part.
            g = [reduce(torch.zeros_like(p) if gi is None else gi) for gi, p in zip(g, params, strict=True)]
        grads.append(g)

    # Gram matrix of the term gradients, G[i, j] = <g_i, g_j>, accumulated parameter by parameter in
    # float64 (bfloat16 gradients of millions of weights lose digits in a float32 sum).
    n = len(names)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for k in range(len(params)):
        flat = [None if g[k] is None else g[k].detach().reshape(-1).to(torch.float64) for g in grads]
        for i in range(n):
            if flat[i] is None:
                continue
            for j in range(i, n):
                if flat[j] is not None:
                    gram[i, j] += torch.dot(flat[i], flat[j]).to(device)
    gram = torch.triu(gram) + torch.triu(gram, diagonal=1).T

    norms = gram.diagonal().clamp_min(0).sqrt()
    # <g_i, g> = sum_j G[i, j] and ||g||^2 = sum_ij G[i, j].
    along = gram.sum(dim=1)
    total = along.sum()
    shares = along / total if total > 0 else torch.full_like(along, float("nan"))
    out: dict[str, dict] = {name: {"norm": norms[i], "share": shares[i], "cos": {}} for i, name in enumerate(names)}
    for i, j in combinations(range(n), 2):
        denom = norms[i] * norms[j]
        cos = gram[i, j] / denom if denom > 0 else torch.zeros((), dtype=torch.float64, device=device)
        out[names[i]]["cos"][names[j]] = cos
        out[names[j]]["cos"][names[i]] = cos
    return out


__all__ = ["gradient_shares"]


UNSOLVED_MARGIN = math.log(9.0)
"""A drawn negative counts as solved once ``a_i <= -UNSOLVED_MARGIN``: the positive image beats it by a
margin of ln 9 ~ 2.2 in beta-scaled implicit reward, where the negative's own pairwise loss
``softplus(a_i)`` (mDPO's conditional loss) has a gradient ``sigmoid(a_i) <= 0.1``, a tenth of what an
unsolved negative gets. Above it the negative still pushes (docs/evaluation.md, "Probes")."""


def unsolved_share(advantages: Tensor, margin: float = UNSOLVED_MARGIN) -> Tensor:
    """The share of drawn negatives not yet solved: ``mean(a_i > -margin)`` over a ``[B, K]`` batch of
    image advantages ``a_i = beta [r(y_p|m_i) - r(y_p|m_p)]`` (``misp.losses.image_advantages``)."""
    if advantages.dim() != 2 or advantages.shape[1] == 0:
        raise ValueError(f"unsolved_share: advantages must be [B, K] with K >= 1, got {tuple(advantages.shape)}")
    return (advantages.detach() > -margin).float().mean()
