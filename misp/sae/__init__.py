"""Sparse autoencoder over CLIP-space difference vectors: the model, its metrics, feature inspection."""

from __future__ import annotations

from misp.sae.inspect import describe_latents, top_activating
from misp.sae.metrics import sae_metrics
from misp.sae.model import SAEConfig, SAEOutput, SparseAutoencoder, bernoulli_kl

__all__ = [
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "bernoulli_kl",
    "describe_latents",
    "sae_metrics",
    "top_activating",
]
