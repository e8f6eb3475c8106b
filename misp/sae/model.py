"""Sparse autoencoder over CLIP-space difference vectors (method.md section 3), as a plain ``nn.Module``.

Two architectures share one class:

- ``kl`` (as published for MISP-DPO): ``z = sigmoid(W_enc d + b_enc)``, ``D(z) = W_dec^T z + b_dec``,
  loss ``mean_batch ||d - D(z)||^2 + gamma * sum_j KL(rho || rho_hat_j)``.
- ``topk`` (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
  ``z = relu(topk(W_enc (d - b_pre) + b_enc))``, ``D(z) = W_dec^T z + b_pre``, unit-norm decoder directions,
  AuxK loss on dead latents.

Weight convention: ``W_enc`` and ``W_dec`` are both stored as ``[n_latents, d_in]``. Row ``j`` of ``W_dec``
is the decoder direction of latent ``j`` (so ``decode(z) = z @ W_dec + bias``), and row ``j`` of ``W_enc``
is latent ``j``'s encoder filter (``nn.Linear`` layout, ``pre = d @ W_enc.T + b_enc``). "Encoder initialised
as the decoder transpose" therefore reads ``W_enc = W_dec`` in storage. The input-side bias is one
parameter, ``b_dec``: for ``topk`` it is Gao's ``b_pre`` (subtracted before encoding and added after
decoding; also readable as ``model.b_pre``), for ``kl`` it is the published decoder bias (added only).

Training-loop obligations for ``topk`` (``model.unit_norm_decoder`` is True): call
``remove_parallel_grads_()`` after backward and before the optimiser step, and ``normalize_decoder_()``
after it. The projection is linear, so it is correct on AMP-scaled gradients too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KL_CLAMP = 1e-6  # keeps log(rho_hat) and log(1 - rho_hat) finite when a latent saturates
_NORM_EPS = 1e-12


@dataclass
class SAEConfig:
    """Hyper-parameters of the sparse autoencoder (method.md section 3)."""

    d_in: int
    """Input dimension: the dimension of the difference vectors (set by the caller from the data)."""

    architecture: Literal["kl", "topk"] = "topk"
    """``topk`` (Gao et al. 2024, the default) or ``kl`` (sigmoid latents with a KL sparsity penalty, as
    published for MISP-DPO)."""

    n_latents: int = 128
    """Number of latents h."""

    rho: float = 0.05
    """kl: target mean activation of every latent in the Bernoulli KL penalty."""

    gamma: float = 1.0
    """kl: weight of the summed KL sparsity penalty."""

    kl_fire_threshold: float | None = None
    """kl: activation above which a sigmoid latent counts as firing (for L0 and dead-latent accounting),
    since sigmoid latents are never exactly zero. None means 2 * rho: clearly above the target mean rate.
    (A fixed 0.5 reads nothing: trained on the Shapes world, every kl latent sits near rho, 99% of
    activations below 0.1, the decoder rows growing instead; the KL penalty is met without sparsity.)"""

    k: int = 8
    """topk: number of latents kept per sample (before the ReLU, so at most k are active)."""

    auxk_coef: float = 1.0 / 32.0
    """topk: weight of the AuxK loss (Gao et al. use 1/32)."""

    aux_k: int | None = None
    """topk: number of dead latents the AuxK path may use per sample; ``None`` means ``2 * k``, capped at
    ``n_latents``. Gao et al.'s rule (a power of two near d_in / 2) assumes n_latents >> d_in; with the
    small dictionaries here it would exceed n_latents and make the auxiliary code dense, so the default
    keeps it as sparse as the main code while letting several dead latents compete per sample."""

    dead_after: int = 10_000
    """Training samples without firing after which a latent counts as dead (feeds AuxK and the
    dead-fraction metric)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("kl", "topk"):
            raise ValueError(f"SAEConfig.architecture must be 'kl' or 'topk', got {self.architecture!r}")
        if self.d_in < 1:
            raise ValueError(f"SAEConfig.d_in must be a positive dimension, got {self.d_in}")
        if self.n_latents < 1:
            raise ValueError(f"SAEConfig.n_latents must be >= 1, got {self.n_latents}")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"SAEConfig.rho must lie strictly between 0 and 1, got {self.rho}")
        if self.gamma < 0:
            raise ValueError(f"SAEConfig.gamma must be >= 0, got {self.gamma}")
        if self.kl_fire_threshold is not None and not 0.0 <= self.kl_fire_threshold < 1.0:
            raise ValueError(f"SAEConfig.kl_fire_threshold must lie in [0, 1), got {self.kl_fire_threshold}")
        if self.k < 1 or (self.architecture == "topk" and self.k > self.n_latents):
            raise ValueError(f"SAEConfig.k must lie in [1, n_latents={self.n_latents}], got {self.k}")
        if self.auxk_coef < 0:
            raise ValueError(f"SAEConfig.auxk_coef must be >= 0, got {self.auxk_coef}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"SAEConfig.aux_k must be >= 1 or None, got {self.aux_k}")
        if self.dead_after < 1:
            raise ValueError(f"SAEConfig.dead_after must be >= 1, got {self.dead_after}")

    @property
    def resolved_kl_fire_threshold(self) -> float:
        """The effective kl firing threshold: ``kl_fire_threshold``, or 2 * rho when None."""
        return self.kl_fire_threshold if self.kl_fire_threshold is not None else 2 * self.rho

    @property
    def resolved_aux_k(self) -> int:
        """The effective ``aux_k``: the default ``2 * k`` applied, capped at ``n_latents``."""
        return min(self.aux_k if self.aux_k is not None else 2 * self.k, self.n_latents)


@dataclass
class SAEOutput:
    """Result of ``SparseAutoencoder.forward``."""

    reconstruction: Tensor
    """``D(E(d))``, shape ``[n, d_in]``."""

    latents: Tensor
    """``E(d)``, shape ``[n, n_latents]``."""

    loss: Tensor
    """Scalar training loss: ``recon + gamma * kl`` (kl) or ``recon + auxk_coef * auxk`` (topk)."""

    losses: dict[str, Tensor]
    """Unweighted loss parts: ``recon`` and ``kl`` (kl) or ``recon`` and ``auxk`` (topk)."""


def bernoulli_kl(rho: float, rho_hat: Tensor) -> Tensor:
    """Elementwise ``KL(Bernoulli(rho) || Bernoulli(rho_hat))``, with ``rho_hat`` clamped away from 0 and 1."""
    rho_hat = rho_hat.clamp(_KL_CLAMP, 1.0 - _KL_CLAMP)
    return rho * torch.log(rho / rho_hat) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - rho_hat))


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder with ``kl`` or ``topk`` latents; see the module docstring for the conventions.

    Both architectures start from unit-norm Gaussian decoder rows, the encoder equal to the decoder
    transpose and zero biases, except kl's ``b_enc`` (below). Call ``init_from_data`` with a data sample
    before training to set ``b_dec`` (``b_pre`` for topk) to the data mean.

    A buffer ``samples_since_fired`` ``[n_latents]`` counts, per latent, the training samples seen since
    the last batch in which it fired; it is updated by forward passes in training mode only and is part
    of the state dict, so a resumed run keeps its dead-latent statistics. "Fired" means ``z > 0`` for
    topk and ``z > kl_fire_threshold`` (default 2 rho) for kl, whose sigmoid latents are never exactly zero.

    Initialisation: for kl, ``b_enc = logit(rho)`` so every latent starts at its target rate (the
    published description gives no initialisation; with ``b_enc = 0`` all latents start at 0.5 and the
    first steps are spent undoing that).
    """

    def __init__(self, config: SAEConfig) -> None:
        """Build the autoencoder described by ``config``."""
        super().__init__()
        self.config = config
        h, d = config.n_latents, config.d_in
        self.W_dec = nn.Parameter(torch.empty(h, d))
        self.W_enc = nn.Parameter(torch.empty(h, d))
        self.b_enc = nn.Parameter(torch.zeros(h))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("samples_since_fired", torch.zeros(h, dtype=torch.long))
        self.reset_parameters()

    # ------------------------------------------------------------------ setup

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose, ``b_enc`` = 0 (topk) or logit(rho)
        (kl), ``b_dec`` = 0, fresh dead counters."""
        nn.init.normal_(self.W_dec)
        self.normalize_decoder_()
        self.W_enc.copy_(self.W_dec)
        if self.config.architecture == "kl":
            # Start every sigmoid latent near its target rate: with b_enc = 0 all latents sit at 0.5, the
            # first reconstructions sum h half-weighted directions and the KL term dominates early steps.
            self.b_enc.fill_(math.log(self.config.rho / (1.0 - self.config.rho)))
        else:
            self.b_enc.zero_()
        self.b_dec.zero_()
        self.samples_since_fired.zero_()

    @torch.no_grad()
    def init_from_data(self, sample: Tensor) -> None:
        """Set ``b_dec`` (``b_pre`` for topk) to the mean of ``sample`` ``[n, d_in]``.

        The mean, not the geometric median: method.md asks for the mean, it is exact and cheap, and for
        difference vectors (roughly centred by construction) the two nearly coincide.
        """
        sample = self._check_input(sample)
        if sample.shape[0] == 0:
            raise ValueError("init_from_data needs at least one sample")
        self.b_dec.copy_(sample.mean(dim=0))

    @property
    def b_pre(self) -> Tensor:
        """Gao et al.'s pre-encoder bias; the same parameter as ``b_dec``."""
        return self.b_dec

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training must keep decoder rows unit-norm (topk) via the two in-place helpers."""
        return self.config.architecture == "topk"

    # ------------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row (latent direction) to unit L2 norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from ``W_dec.grad`` each row's component parallel to that decoder row, in place.

        With unit-norm rows the parallel component only changes a row's length, which
        ``normalize_decoder_`` would undo anyway; removing it keeps the optimiser's state (Adam moments)
        about directions only.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        coef = (grad * w).sum(dim=1, keepdim=True) / (w * w).sum(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        grad.sub_(coef * w)

    # ------------------------------------------------------------------ encode / decode

    def _check_input(self, d: Tensor) -> Tensor:
        if not isinstance(d, Tensor):
            raise TypeError(
                f"expected a torch.Tensor of shape [n, {self.config.d_in}], got {type(d).__name__}"
            )
        if d.ndim != 2 or d.shape[1] != self.config.d_in:
            raise ValueError(f"expected input of shape [n, {self.config.d_in}], got {tuple(d.shape)}")
        if not d.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {d.dtype}")
        # Caches may hold half precision; compute in the parameters' dtype.
        return d.to(self.W_dec.dtype)

    def pre_activations(self, d: Tensor) -> Tensor:
        """Encoder pre-activations ``[n, n_latents]``: ``W_enc d + b_enc`` (kl) or ``W_enc (d - b_pre) + b_enc`` (topk)."""
        d = self._check_input(d)
        if self.config.architecture == "topk":
            d = d - self.b_dec
        return F.linear(d, self.W_enc, self.b_enc)

    def _activate(self, pre: Tensor) -> Tensor:
        if self.config.architecture == "kl":
            return torch.sigmoid(pre)
        vals, idx = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))

    def encode(self, d: Tensor) -> Tensor:
        """Latents ``E(d)`` ``[n, n_latents]``: sigmoid (kl) or ReLU of the k largest pre-activations (topk)."""
        return self._activate(self.pre_activations(d))

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction ``D(z) = z @ W_dec + b_dec`` ``[n, d_in]`` from latents ``z`` ``[n, n_latents]``."""
        if z.ndim != 2 or z.shape[1] != self.config.n_latents:
            raise ValueError(f"expected latents of shape [n, {self.config.n_latents}], got {tuple(z.shape)}")
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    # ------------------------------------------------------------------ dead latents

    def fired(self, z: Tensor) -> Tensor:
        """Bool ``[n, n_latents]``: which latents count as firing (``> 0`` topk, ``> kl_fire_threshold`` kl)."""
        return z > (self.config.resolved_kl_fire_threshold if self.config.architecture == "kl" else 0.0)

    @torch.no_grad()
    def _update_dead_stats(self, z: Tensor) -> None:
        fired_any = self.fired(z).any(dim=0)
        self.samples_since_fired.add_(z.shape[0])
        self.samples_since_fired.masked_fill_(fired_any, 0)

    def dead_mask(self) -> Tensor:
        """Bool ``[n_latents]``: latents that have not fired in the last ``dead_after`` training samples."""
        return self.samples_since_fired >= self.config.dead_after

    # ------------------------------------------------------------------ losses

    def _auxk_loss(self, pre: Tensor, residual: Tensor) -> Tensor:
        """Normalised AuxK loss ``||e - W_dec^T z_aux||^2 / ||e - mean(e)||^2`` summed over the batch.

        ``z_aux`` = ReLU of the top-``aux_k`` pre-activations among dead latents only (fewer when fewer
        are dead). ``e`` is the detached main residual, so the gradient reaches only the dead latents'
        encoder rows and biases, their decoder rows and ``b_pre``. Normalised as in Gao et al.'s code:
        the loss is the fraction of the residual's variance the dead latents leave unexplained, so it
        stays informative as the residual shrinks. Zero when no latent is dead, or when the residual has
        no variance across the batch (e.g. a batch of one).
        """
        # No host sync: topk always takes aux_k slots; slots beyond the dead latents hold -inf, which the
        # ReLU turns into exact zeros with zero gradient.
        dead = self.dead_mask()
        masked = pre.masked_fill(~dead, -math.inf)
        vals, idx = masked.topk(self.config.resolved_aux_k, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        num = (residual - z_aux @ self.W_dec).pow(2).sum()
        den = (residual - residual.mean(dim=0, keepdim=True)).pow(2).sum()
        usable = dead.any() & (den > 0)
        ratio = num / torch.where(usable, den, torch.ones_like(den))
        return torch.where(usable, ratio, torch.zeros_like(ratio))

    def forward(self, d: Tensor) -> SAEOutput:
        """Encode, decode and compute the loss of the batch ``d`` ``[n, d_in]``.

        In training mode this also updates the dead-latent counters (before AuxK reads them, as in
        Gao et al.'s code, so a latent that fires in this batch is not treated as dead).
        """
        d = self._check_input(d)
        pre = self.pre_activations(d)
        z = self._activate(pre)
        recon = self.decode(z)
        recon_loss = (d - recon).pow(2).sum(dim=1).mean()
        if self.training:
            self._update_dead_stats(z)
        cfg = self.config
        if cfg.architecture == "kl":
            kl = bernoulli_kl(cfg.rho, z.mean(dim=0)).sum()
            losses = {"recon": recon_loss, "kl": kl}
            loss = recon_loss + cfg.gamma * kl
        else:
            aux = self._auxk_loss(pre, (d - recon).detach())
            losses = {"recon": recon_loss, "auxk": aux}
            loss = recon_loss + cfg.auxk_coef * aux
        return SAEOutput(reconstruction=recon, latents=z, loss=loss, losses=losses)
