"""Feature inspection: which difference pairs activate a latent most, and do they share one change."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor


def _check_latents(latents: Tensor) -> None:
    if not isinstance(latents, Tensor) or latents.ndim != 2:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"expected latents as a tensor of shape [n, h], got {shape}")


def top_activating(latents: Tensor, latent: int, k: int = 10) -> tuple[Tensor, Tensor]:
    """Indices and values of the ``k`` samples activating ``latent`` most, highest first.

    Args:
        latents: ``[n, h]`` latent activations (``SparseAutoencoder.encode`` output).
        latent: the latent's column index.
        k: how many samples; fewer (``n``) are returned when the batch holds fewer than ``k``.

    Returns:
        ``(indices [min(k, n)], values [min(k, n)])``.
    """
    _check_latents(latents)
    n, h = latents.shape
    if not 0 <= latent < h:
        raise IndexError(f"latent {latent} out of range for {h} latents")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values, indices = latents[:, latent].topk(min(k, n))
    return indices, values


@torch.no_grad()
def describe_latents(
    latents: Tensor, labels: list[str], k: int = 5, n_latents_to_show: int | None = None
) -> list[dict[str, Any]]:
    """Describe each latent by the labels of its top-``k`` activating difference pairs.

    Args:
        latents: ``[n, h]`` latent activations of ``n`` difference pairs.
        labels: ``n`` strings describing each pair (e.g. ``"red circle -> blue circle"``).
        k: how many top activations per latent (capped at ``n``).
        n_latents_to_show: keep only the first this many latents of the ranking; ``None`` keeps all.

    Returns:
        One dict per latent, ranked by ``agreement`` (highest first), then by ``mean_activation`` of the
        top entries, then by latent index. Keys: ``latent`` (index), ``indices``, ``labels`` and
        ``activations`` of the top entries (only entries where the latent is active, ``> 0``),
        ``top_label`` (the most common of those labels, the highest-activating one on ties; ``None`` if
        the latent never fires), ``agreement`` (how many of the ``k`` top slots carry ``top_label``,
        divided by ``k``: a latent that fires on fewer than ``k`` pairs cannot score 1) and
        ``mean_activation``.
    """
    _check_latents(latents)
    n, h = latents.shape
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} rows of latents")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_latents_to_show is not None and n_latents_to_show < 0:
        raise ValueError(f"n_latents_to_show must be >= 0 or None, got {n_latents_to_show}")
    k_eff = min(k, n)
    if n == 0:
        values = latents.new_zeros(0, h)
        indices = torch.zeros(0, h, dtype=torch.long)
    else:
        values, indices = latents.float().topk(k_eff, dim=0)  # [k_eff, h]
    rows: list[dict[str, Any]] = []
    for j in range(h):
        active = values[:, j] > 0
        idx = indices[active, j].tolist()
        acts = values[active, j].tolist()
        top_labels = [labels[i] for i in idx]
        if top_labels:
            top_label, count = Counter(top_labels).most_common(1)[0]
        else:
            top_label, count = None, 0
        rows.append(
            {
                "latent": j,
                "indices": idx,
                "labels": top_labels,
                "activations": acts,
                "top_label": top_label,
                "agreement": count / k_eff if k_eff else 0.0,
                "mean_activation": sum(acts) / len(acts) if acts else 0.0,
            }
        )
    rows.sort(key=lambda r: (-r["agreement"], -r["mean_activation"], r["latent"]))
    return rows if n_latents_to_show is None else rows[:n_latents_to_show]
