"""Quality metrics of a sparse autoencoder on a batch (method.md section 3, "Logged")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from misp.sae.model import SAEOutput, SparseAutoencoder


@torch.no_grad()
def sae_metrics(d: Tensor, output: SAEOutput, model: SparseAutoencoder) -> dict[str, float]:
    """Metrics of ``output = model(d)`` on the batch ``d`` ``[n, d_in]``.

    Returns:
        - ``fvu``: fraction of variance unexplained, ``sum ||d - recon||^2 / sum ||d - mean(d)||^2`` with
          the mean over this batch; ``nan`` when the batch has no variance (e.g. a single sample), so
          aggregate over batches of several samples.
        - ``l0``: mean number of active latents per sample: ``z > 0`` for topk; for kl, whose sigmoid
          latents are never exactly zero, the mean number of latents above ``kl_fire_threshold``
          (default 0.5, the same threshold the dead-latent counter uses). The kl decoder norm is free, so
          a kl model that encodes with small activations reads a low L0 here: compare
          ``mean_activation`` and FVU too.
        - ``dead_fraction``: share of latents the model's counter marks dead (``model.dead_mask()``).
        - ``recon_cosine``: mean cosine similarity between each ``d`` and its reconstruction.
        - kl only: ``mean_activation`` (mean over latents of the batch-mean activation ``rho_hat``) and
          ``rho`` (its target) for comparison.
    """
    if d.ndim != 2:
        raise ValueError(f"expected d of shape [n, d_in], got {tuple(d.shape)}")
    recon, z = output.reconstruction, output.latents
    if recon.shape != d.shape:
        raise ValueError(f"reconstruction shape {tuple(recon.shape)} does not match d {tuple(d.shape)}")
    if z.ndim != 2 or z.shape[0] != d.shape[0]:
        raise ValueError(f"latents of shape {tuple(z.shape)} do not match a batch of {d.shape[0]}")
    d = d.to(recon.dtype)
    err = (d - recon).pow(2).sum()
    var = (d - d.mean(dim=0, keepdim=True)).pow(2).sum()
    fvu = (err / var).item() if var > 0 else float("nan")
    out = {
        "fvu": fvu,
        "l0": model.fired(z).sum(dim=1).float().mean().item(),
        "dead_fraction": model.dead_mask().float().mean().item(),
        "recon_cosine": F.cosine_similarity(d, recon, dim=1).mean().item(),
    }
    if model.config.architecture == "kl":
        out["mean_activation"] = z.mean().item()
        out["rho"] = float(model.config.rho)
    return out
