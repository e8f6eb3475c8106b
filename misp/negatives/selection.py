"""Greedy diverse selection of each record's negative pool (method.md section 4.3) and the proposal's
per-negative features (method.md section 4.4).

    first:  argmax_i s_i
    then:   argmax_{i not chosen} [ s_i + beta_div * min_{j chosen} (1 - cos(z_i, z_j)) ]

All records are processed at once; the only Python loop runs over the ``m`` selection steps. Each step
updates a running ``min_j (1 - cos)`` per candidate against the item just chosen, so memory is
``O(R * N * h)`` (the codes) and no ``[R, N, N]`` Gram matrix is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def greedy_diverse_select(
    scores: torch.Tensor,
    latents: torch.Tensor,
    valid: torch.Tensor,
    m: int,
    beta_div: float = 0.5,
    pinned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``m`` high-scoring, mutually diverse candidates per record.

    Args:
        scores: ``[R, N]`` SAE scores ``s_i``.
        latents: ``[R, N, h]`` SAE codes ``z_i = E(d_i)``. An all-zero code has cosine 0 with everything
            (diversity term 1).
        valid: ``[R, N]`` bool; invalid candidates are never chosen.
        m: negatives to choose per record.
        beta_div: weight of the diversity term.
        pinned: optional ``[R, N]`` bool: valid candidates chosen before any other (by the same objective
            among themselves), so they are in the selection whenever they number at most ``m``.

    Returns:
        ``(indices [R, m] long, gains [R, m] float32)``, in selection order. ``gains[r, k]`` is the diversity
        term ``min_{j chosen} (1 - cos(z_i, z_j))`` of the ``k``-th chosen item at the time it was chosen;
        the first item has no chosen set to differ from and gets ``1.0``, the largest value the term takes
        for the non-negative codes both SAE architectures produce. A record with fewer than ``m`` valid
        candidates is padded with index ``-1`` and gain ``0.0`` after its valid ones. Ties in the objective
        go to the lowest candidate index.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected scores [R, N], got {tuple(scores.shape)}")
    R, N = scores.shape
    if latents.ndim != 3 or latents.shape[:2] != (R, N):
        raise ValueError(f"expected latents [{R}, {N}, h], got {tuple(latents.shape)}")
    if valid.shape != (R, N) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of shape ({R}, {N}), got {valid.dtype} {tuple(valid.shape)}"
        )
    if m < 1:
        raise ValueError(f"m must be positive, got {m}")
    if pinned is not None and (pinned.shape != (R, N) or pinned.dtype != torch.bool):
        raise ValueError(f"pinned must be a bool tensor of shape ({R}, {N}), got {pinned.dtype} {tuple(pinned.shape)}")

    device = scores.device
    s = scores.float()
    zn = F.normalize(latents.float().to(device), dim=-1)
    avail = valid.to(device).clone()
    # Running min_{j chosen} (1 - cos(z_i, z_j)); +inf while nothing is chosen.
    min_div = torch.full((R, N), float("inf"), dtype=torch.float32, device=device)
    rows = torch.arange(R, device=device)
    indices = torch.full((R, m), -1, dtype=torch.long, device=device)
    gains = torch.zeros(R, m, dtype=torch.float32, device=device)
    neg_inf = torch.tensor(float("-inf"), device=device)
    for k in range(m):
        objective = s if k == 0 else s + beta_div * min_div
        allowed = avail
        if pinned is not None:  # a record with pinned candidates left chooses among them first
            first = avail & pinned.to(device)
            allowed = torch.where(first.any(1, keepdim=True), first, avail)
        objective = torch.where(allowed, objective, neg_inf)
        # argmax returns the first maximum, which gives the lowest-index tie rule.
        pick = objective.argmax(dim=1)
        has = avail[rows, pick]
        gain = torch.ones(R, device=device) if k == 0 else min_div[rows, pick]
        indices[:, k] = torch.where(has, pick, torch.full_like(pick, -1))
        gains[:, k] = torch.where(has, gain, torch.zeros_like(gain))
        avail[rows, pick] = avail[rows, pick] & ~has
        # A record with nothing left has no available candidate again, so updating its row is harmless.
        cos = torch.einsum("rnh,rh->rn", zn, zn[rows, pick])
        min_div = torch.minimum(min_div, 1 - cos)
    return indices, gains


def selection_features(
    l: torch.Tensor,  # noqa: E741 (method.md's name for the reconstruction error)
    v: torch.Tensor,
    gains: torch.Tensor,
    clip_cos: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The proposal's features of each selected negative (method.md 4.4).

    ``f_i = [l_i / max l, v_i / max v, diversity gain at selection, CLIP cosine(m_p, m_i)]``, with the
    maxima over the record's valid candidates (all ``N`` when ``valid`` is None) and a zero max guarded
    (the ratio reads 0).

    Args:
        l: ``[R, N]`` reconstruction errors.
        v: ``[R, N]`` code L1 norms.
        gains: ``[R, m]`` diversity gains from :func:`greedy_diverse_select`.
        clip_cos: ``[R, N]`` CLIP image cosine between the positive and each candidate (retrieval's sims).
        indices: ``[R, m]`` selected candidates, ``-1`` for padding.
        valid: ``[R, N]`` bool, or None for all valid.

    Returns:
        ``[R, m, 4]`` float32; padded slots (index ``-1``) are all zeros.
    """
    R, N = l.shape
    for name, t in (("v", v), ("clip_cos", clip_cos)):
        if t.shape != (R, N):
            raise ValueError(f"{name} must have shape ({R}, {N}), got {tuple(t.shape)}")
    if indices.ndim != 2 or indices.shape[0] != R or gains.shape != indices.shape:
        raise ValueError(
            f"expected indices and gains [{R}, m], got {tuple(indices.shape)} and {tuple(gains.shape)}"
        )
    if valid is None:
        valid = torch.ones(R, N, dtype=torch.bool, device=l.device)

    def ratio(x: torch.Tensor) -> torch.Tensor:
        x = x.float().masked_fill(~valid, 0.0)
        mx = x.amax(dim=1, keepdim=True)
        return x / torch.where(mx > 0, mx, torch.ones_like(mx))

    chosen = indices >= 0
    safe = indices.clamp(min=0)
    cols = [
        ratio(l).gather(1, safe),
        ratio(v).gather(1, safe),
        gains.float(),
        clip_cos.float().gather(1, safe),
    ]
    feats = torch.stack(cols, dim=-1)
    return feats.masked_fill(~chosen[..., None], 0.0)
