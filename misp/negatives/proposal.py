"""The learnable proposal q_phi over each example's selected negatives, and its seeded per-epoch draws.

method.md section 4.4: over the M negatives selected for an example,

    q_phi(i) = (1 - eps) * softmax_i(w . f_i / tau) + eps / M

with per-candidate features ``f_i`` (SAE reconstruction difficulty, latent deviation, diversity gain,
CLIP cosine to the positive) and ``phi = (w, log tau)``. The floor ``eps / M`` bounds every importance
weight ``exp(a)/q`` by ``M / eps * exp(a)``, so a proposal that has drifted away from the model's
preferences can slow learning but never blow up the loss.

Each epoch the datamodule draws K negatives per example with replacement from the current q_phi. The
draws are a pure function of ``(seed, epoch, record id)`` and the record's q row: a counter-based hash
(splitmix64) turns those into uniforms, and an inverse-CDF lookup turns the uniforms into indices. So a
record gets the same negatives whatever batch, order, worker or rank it lands on, and a resumed run
reproduces the epoch exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ProposalNet", "draw_negatives", "gather_log_q", "record_key"]


class ProposalNet(nn.Module):
    """``q_phi(i) = (1 - eps) softmax(w . f_i / tau) + eps / M`` over each example's valid candidates.

    ``w`` starts at zero, so the initial proposal is uniform (the "random multi-negative" baseline) and
    learning moves it only as far as the model's preferences justify.

    Args:
        num_features: length F of each candidate's feature vector.
        eps: defensive mixture weight in [0, 1]; every valid candidate gets ``q >= eps / M``.
        init_temperature: initial softmax temperature tau, > 0 (learned as ``log tau``).
    """

    fsdp_own_unit = True
    """FSDP1 gives q_phi a unit of its own (``TrainableLeafWrapPolicy``): the datamodule gathers it alone."""

    def __init__(self, num_features: int = 4, eps: float = 0.1, init_temperature: float = 1.0) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps must lie in [0, 1], got {eps}")
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        self.num_features = num_features
        self.eps = float(eps)
        self.w = nn.Parameter(torch.zeros(num_features))
        # Shape [1], not a scalar: FSDP flattens parameters and refuses 0-d ones.
        self.log_tau = nn.Parameter(torch.full((1,), math.log(init_temperature)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before log_tau became 1-D hold a scalar: reshape it rather than refuse it.
        key = prefix + "log_tau"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def temperature(self) -> Tensor:
        """tau as a 0-d tensor."""
        return self.log_tau.exp().squeeze(0)

    def log_probs(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log-probabilities of every candidate under q_phi.

        Args:
            features: ``[R, M, F]`` candidate features.
            mask: optional ``[R, M]`` bool, True for real candidates (rows may have fewer than M).

        Returns:
            ``[R, M]`` log q, ``-inf`` on masked entries; each row's probabilities sum to 1 over its
            ``M_valid`` real candidates and each is at least ``eps / M_valid``.
        """
        if features.dim() != 3 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"features must be [R, M, {self.num_features}], got shape {tuple(features.shape)}"
            )
        r, m, _ = features.shape
        if mask is None:
            mask = torch.ones(r, m, dtype=torch.bool, device=features.device)
        elif mask.dtype != torch.bool or mask.shape != (r, m):
            raise ValueError(
                f"mask must be a bool tensor of shape {(r, m)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        n_valid = mask.sum(dim=-1, keepdim=True)
        if bool((n_valid == 0).any()):
            raise ValueError("every row needs at least one valid candidate")
        # Zero padded features: their scores are masked anyway, but 0 * nan in the backward would not be.
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        w = self.w.to(features.dtype)
        temperature = self.temperature
        # Kept for logging: outside forward a sharded (FSDP) q_phi holds only part of log_tau on this rank.
        self.last_temperature = temperature.detach()
        scores = (features @ w) / temperature.to(features.dtype)
        log_soft = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        if self.eps == 0.0:
            return log_soft
        log_uniform = -n_valid.to(features.dtype).log()
        if self.eps == 1.0:
            mixed = log_uniform.expand_as(log_soft)
        else:
            # log((1 - eps) p + eps / M) in log space: p may underflow to 0 without q doing so.
            mixed = torch.logaddexp(log_soft + math.log1p(-self.eps), log_uniform + math.log(self.eps))
        return mixed.masked_fill(~mask, float("-inf"))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Alias of :meth:`log_probs`."""
        return self.log_probs(features, mask)


_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_DRAW_DOMAIN = 0x4D495350  # "MISP": separates these streams from any other use of the same seed


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (numpy uint64 arithmetic wraps modulo 2^64, as required)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def record_key(record_id: str) -> int:
    """Stable 64-bit hash of a record id (BLAKE2b), identical across processes, machines and runs."""
    return int.from_bytes(hashlib.blake2b(record_id.encode("utf-8"), digest_size=8).digest(), "little")


def _uniforms(seed: int, epoch: int, record_ids: Sequence[str], k: int) -> np.ndarray:
    """``[R, K]`` float64 uniforms in [0, 1), a pure function of (seed, epoch, record id, draw index)."""
    ids = np.fromiter((record_key(rid) for rid in record_ids), dtype=np.uint64, count=len(record_ids))
    with np.errstate(over="ignore"):
        base = _mix64(np.array([(seed ^ (_DRAW_DOMAIN << 32)) & _MASK64], dtype=np.uint64))
        base = _mix64(base ^ np.uint64(epoch & _MASK64))
        keys = _mix64(ids ^ base)  # [R]
        counters = np.arange(1, k + 1, dtype=np.uint64) * _GAMMA  # [K], splitmix64's Weyl sequence
        bits = _mix64(keys[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw_negatives(log_q: Tensor, k: int, seed: int, epoch: int, record_ids: Sequence[str]) -> Tensor:
    """Draw K candidate indices per record, with replacement, from the proposal rows ``exp(log_q)``.

    Deterministic in ``(seed, epoch, record id)`` and the record's own row of ``log_q``: the same record
    gets the same draws whatever the batch composition, order or rank; another epoch gives fresh draws.

    Args:
        log_q: ``[R, M]`` proposal log-probabilities (``-inf`` for invalid candidates, never drawn).
        k: draws per record, >= 1.
        seed: run seed.
        epoch: epoch number.
        record_ids: the R record ids, aligned with the rows of ``log_q``.

    Returns:
        ``[R, K]`` int64 indices into the M candidates, on ``log_q``'s device.
    """
    if log_q.dim() != 2:
        raise ValueError(f"log_q must be [R, M], got shape {tuple(log_q.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(record_ids) != log_q.shape[0]:
        raise ValueError(f"got {len(record_ids)} record ids for {log_q.shape[0]} rows of log_q")
    if log_q.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.long, device=log_q.device)
    return inverse_cdf(log_q, torch.from_numpy(_uniforms(seed, epoch, record_ids, k)))


def inverse_cdf(log_q: Tensor, u: Tensor) -> Tensor:
    """``[R, K]`` indices drawn from the rows ``exp(log_q [R, M])`` (normalised here) by the uniforms ``u [R, K]``."""
    probs = log_q.detach().to(torch.float64).exp()
    if bool(torch.isnan(probs).any()):
        raise ValueError("log_q holds NaN")
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if bool((total <= 0).any()):
        raise ValueError("every row of log_q needs a candidate with positive probability")
    # Normalising makes the last valid entry exactly 1, so u < 1 never lands past it.
    cdf = cdf / total
    idx = torch.searchsorted(cdf, u.to(device=cdf.device, dtype=torch.float64).contiguous(), right=True)
    return idx.clamp_max(log_q.shape[1] - 1)


def gather_log_q(log_q: Tensor, indices: Tensor) -> Tensor:
    """``log_q[r, indices[r, k]]``: the proposal log-probabilities of the drawn candidates, ``[R, K]``."""
    if log_q.dim() != 2 or indices.dim() != 2 or indices.shape[0] != log_q.shape[0]:
        raise ValueError(
            f"need log_q [R, M] and indices [R, K], got {tuple(log_q.shape)} and {tuple(indices.shape)}"
        )
    return log_q.gather(1, indices.long())
