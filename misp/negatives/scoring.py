"""SAE scores of candidate negatives (method.md section 4.2).

For each record's candidates, with difference vectors ``d_i`` and the sparse autoencoder ``(E, D)``:

    l_i = ||d_i - D(E(d_i))||^2                  reconstruction difficulty
    v_i = ||E(d_i)||_1                           semantic deviation from the positive
    s_i = l_i / max_j l_j + v_i / max_j v_j      max over the record's valid candidates

The SAE is duck-typed: anything with ``encode(d [n, D]) -> z [n, h]`` and ``decode(z) -> [n, D]``.
"""

from __future__ import annotations

from typing import Any

import torch


def _safe_max(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-record max over valid entries ``[R, 1]``; a zero (or empty) max becomes 1 so ratios read 0."""
    m = x.masked_fill(~valid, 0.0).amax(dim=1, keepdim=True)
    return torch.where(m > 0, m, torch.ones_like(m))


def _sae_device_dtype(sae: Any, fallback: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    if isinstance(sae, torch.nn.Module):
        for p in sae.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return fallback.device, torch.float32


def sae_scores(
    sae: Any, d: torch.Tensor, valid: torch.Tensor, batch_size: int = 8192
) -> dict[str, torch.Tensor]:
    """Score every valid candidate with the SAE, in batches of difference vectors.

    Args:
        sae: the sparse autoencoder (``encode``/``decode``); run in eval mode under ``no_grad``, its
            training flag restored afterwards.
        d: difference vectors ``[R, N, D]``.
        valid: ``[R, N]`` bool, False for padding (retrieval's ``-1`` slots); only valid rows reach the SAE.
        batch_size: difference vectors per SAE call.

    Returns:
        A dict of float32 tensors on ``d``'s device:
        ``l [R, N]``, ``v [R, N]``, ``s [R, N]``, ``z [R, N, h]`` (the codes ``E(d_i)``).
        Invalid entries hold ``l = v = 0``, ``z = 0`` and ``s = -inf``, so a max over ``l`` or ``v``
        equals the max over valid entries and no argmax over ``s`` can pick them. A record whose valid
        ``l`` (or ``v``) are all zero gets a zero ratio instead of a division by zero.
        Memory: ``z`` holds ``R * N * h`` floats; chunk over records for large ``R``.
    """
    if d.ndim != 3:
        raise ValueError(f"expected difference vectors [R, N, D], got shape {tuple(d.shape)}")
    if valid.shape != d.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(d.shape[:2])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    R, N, _ = d.shape
    if R * N == 0:
        raise ValueError("no candidates to score")
    sae_device, sae_dtype = _sae_device_dtype(sae, d)
    flat = d.reshape(R * N, -1)
    rows = valid.reshape(-1).nonzero().squeeze(1)

    was_training = getattr(sae, "training", None)
    if isinstance(sae, torch.nn.Module):
        sae.eval()
    try:
        with torch.no_grad():
            l_flat = torch.zeros(R * N, dtype=torch.float32, device=d.device)
            v_flat = torch.zeros(R * N, dtype=torch.float32, device=d.device)
            z_flat: torch.Tensor | None = None
            for b0 in range(0, rows.numel(), batch_size):
                idx = rows[b0 : b0 + batch_size]
                x = flat[idx.to(flat.device)].to(device=sae_device, dtype=sae_dtype)
                z = sae.encode(x)
                recon = sae.decode(z)
                if z_flat is None:
                    z_flat = torch.zeros(R * N, z.shape[-1], dtype=torch.float32, device=d.device)
                idx = idx.to(d.device)
                l_flat[idx] = (x - recon).float().pow(2).sum(-1).to(d.device)
                v_flat[idx] = z.float().abs().sum(-1).to(d.device)
                z_flat[idx] = z.float().to(d.device)
            if z_flat is None:
                # No valid candidate at all: probe one row only to learn the code width h.
                h = sae.encode(flat[:1].to(device=sae_device, dtype=sae_dtype)).shape[-1]
                z_flat = torch.zeros(R * N, h, dtype=torch.float32, device=d.device)
    finally:
        if isinstance(sae, torch.nn.Module) and was_training:
            sae.train()

    valid = valid.to(d.device)
    recon_err = l_flat.view(R, N)
    code_l1 = v_flat.view(R, N)
    score = recon_err / _safe_max(recon_err, valid) + code_l1 / _safe_max(code_l1, valid)
    score = score.masked_fill(~valid, float("-inf"))
    return {"l": recon_err, "v": code_l1, "s": score, "z": z_flat.view(R, N, -1)}
