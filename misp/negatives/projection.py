"""Joint image-prompt embedding in CLIP space (method.md section 2).

The joint embedding of image ``m`` under prompt ``x`` is the flattened outer product
``e(m, x) = vec(h_v(m) h_t(x)^T)`` (row-major: index ``i * d_t + j`` holds ``h_v[i] * h_t[j]``). For large
CLIP models this has ``d_v * d_t`` dimensions (590k for d = 768), so it is projected to ``proj_dim`` by a
fixed, seeded Kronecker-structured Gaussian projection ``P = kron(A, B)``, which never needs the outer
product itself:

    P e = kron(A, B) vec(h_v h_t^T) = vec(A h_v h_t^T B^T) = vec((A h_v) (B h_t)^T)

Scale: ``A`` has i.i.d. ``N(0, 1/a)`` entries and ``B`` i.i.d. ``N(0, 1/b)``, so every entry of ``kron(A, B)``
has standard deviation ``1/sqrt(a*b)`` and ``E ||P e||^2 = ||e||^2``: projected vectors keep the scale of the
unprojected ones (unit norm for unit ``h_v``, ``h_t``), so the SAE sees inputs of the same magnitude either
way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from misp.utils.io import sha256_bytes


def _factor_pair(proj_dim: int, d_v: int, d_t: int) -> tuple[int, int]:
    """The factor pair ``a * b = proj_dim`` whose ratio ``a / b`` is closest to ``d_v / d_t`` (in log scale).

    Ties go to the smaller ``a``, so the choice is deterministic.
    """
    target = math.log(d_v / d_t)
    best: tuple[float, int, int] | None = None
    for a in range(1, proj_dim + 1):
        if proj_dim % a:
            continue
        b = proj_dim // a
        gap = abs(math.log(a / b) - target)
        if best is None or gap < best[0] - 1e-12:
            best = (gap, a, b)
    assert best is not None
    return best[1], best[2]


@dataclass
class JointEmbedding:
    """The map ``(h_v, h_t) -> e`` of method.md section 2, with or without the seeded projection.

    Build it with :func:`make_joint_embedding`; its :meth:`metadata` goes into every cache sidecar that
    stores joint embeddings or difference vectors, so a change of projection invalidates them.
    """

    d_v: int
    """Dimension of the CLIP image embedding ``h_v``."""
    d_t: int
    """Dimension of the CLIP text embedding ``h_t``."""
    proj_dim: int
    """Requested output dimension; used only when ``d_v * d_t > proj_dim``."""
    seed: int
    """Seed of the Gaussian projection matrices."""
    A: torch.Tensor | None = field(default=None, repr=False)
    """Image-side projection ``[a, d_v]``, or ``None`` when no projection is used."""
    B: torch.Tensor | None = field(default=None, repr=False)
    """Text-side projection ``[b, d_t]``, or ``None`` when no projection is used."""

    @property
    def projected(self) -> bool:
        """Whether the outer product is projected (``d_v * d_t > proj_dim``)."""
        return self.A is not None

    @property
    def dim(self) -> int:
        """Output dimension ``D``: ``a * b`` when projected, else ``d_v * d_t``."""
        if self.A is not None and self.B is not None:
            return self.A.shape[0] * self.B.shape[0]
        return self.d_v * self.d_t

    def _check(self, name: str, x: torch.Tensor, dim: int) -> None:
        if x.shape[-1] != dim:
            raise ValueError(f"{name} has last dimension {x.shape[-1]}, expected {dim}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")

    def _outer(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Row-major ``vec(u w^T)`` over leading batch dimensions (``u [..., p]``, ``w [..., q]``)."""
        return (u.unsqueeze(-1) * w.unsqueeze(-2)).flatten(-2)

    def _project(self, h_v: torch.Tensor, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.A is None or self.B is None:
            return h_v, h_t
        A = self.A.to(device=h_v.device, dtype=h_v.dtype)
        B = self.B.to(device=h_t.device, dtype=h_t.dtype)
        return h_v @ A.T, h_t @ B.T

    def embed(self, h_v: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        """Joint embeddings ``e(m, x)`` (projected when configured) of paired rows.

        Args:
            h_v: image embeddings ``[n, d_v]``.
            h_t: text embeddings ``[n, d_t]``, row ``k`` paired with ``h_v[k]``.

        Returns:
            ``[n, D]``, with ``D = self.dim``.
        """
        self._check("h_v", h_v, self.d_v)
        self._check("h_t", h_t, self.d_t)
        if h_v.ndim != 2 or h_t.ndim != 2 or h_v.shape[0] != h_t.shape[0]:
            raise ValueError(
                f"expected h_v [n, d_v] and h_t [n, d_t], got {tuple(h_v.shape)} and {tuple(h_t.shape)}"
            )
        u, w = self._project(h_v, h_t)
        return self._outer(u, w)

    def differences(self, h_pos: torch.Tensor, h_cand: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        """Difference vectors ``d_i = e(m_p, x) - e(m_i, x)`` for every candidate of every record.

        By bilinearity ``d_i = vec((A (h_p - h_i)) (B h_t)^T)``: one small projection per candidate and
        one per prompt, never an outer product of unprojected vectors.

        Args:
            h_pos: positive image embeddings ``[R, d_v]``.
            h_cand: candidate image embeddings ``[R, N, d_v]``.
            h_t: prompt embeddings ``[R, d_t]``.

        Returns:
            ``[R, N, D]``. Memory is ``R * N * D`` floats: chunk over records for large ``R``.
        """
        self._check("h_pos", h_pos, self.d_v)
        self._check("h_cand", h_cand, self.d_v)
        self._check("h_t", h_t, self.d_t)
        if h_pos.ndim != 2 or h_cand.ndim != 3 or h_t.ndim != 2:
            raise ValueError(
                f"expected h_pos [R, d_v], h_cand [R, N, d_v], h_t [R, d_t]; got {tuple(h_pos.shape)}, "
                f"{tuple(h_cand.shape)}, {tuple(h_t.shape)}"
            )
        if not (h_pos.shape[0] == h_cand.shape[0] == h_t.shape[0]):
            raise ValueError(
                f"record counts differ: h_pos {h_pos.shape[0]}, h_cand {h_cand.shape[0]}, h_t {h_t.shape[0]}"
            )
        delta = h_pos.unsqueeze(1) - h_cand
        u, w = self._project(delta, h_t)
        return self._outer(u, w.unsqueeze(1))

    def metadata(self) -> dict[str, Any]:
        """What made this embedding, for cache sidecars: projected or not, factor sizes, seed, checksum."""
        meta: dict[str, Any] = {
            "projected": self.projected,
            "d_v": self.d_v,
            "d_t": self.d_t,
            "proj_dim": self.proj_dim,
            "dim": self.dim,
            "seed": self.seed,
            "a": None,
            "b": None,
            "scale": "A ~ N(0, 1/a), B ~ N(0, 1/b)",
        }
        if self.A is not None and self.B is not None:
            meta["a"], meta["b"] = self.A.shape[0], self.B.shape[0]
            # The checksum catches a change of torch's generator, which the seed alone would not.
            blob = self.A.contiguous().numpy().tobytes() + self.B.contiguous().numpy().tobytes()
            meta["matrices_sha256"] = sha256_bytes(blob)
        return meta


def make_joint_embedding(d_v: int, d_t: int, proj_dim: int = 4096, seed: int = 0) -> JointEmbedding:
    """Build the joint embedding of method.md section 2.

    With ``d_v * d_t <= proj_dim`` the exact outer product is used. Otherwise ``a * b = proj_dim`` is the
    factor pair whose ratio is closest to ``d_v / d_t`` (``64 x 64`` for two 768-dimensional towers and
    the default 4096), and ``A [a, d_v]``, ``B [b, d_t]`` are drawn from a CPU generator seeded with
    ``seed`` (float32), so every machine builds the same matrices.

    Args:
        d_v: CLIP image embedding dimension.
        d_t: CLIP text embedding dimension.
        proj_dim: output dimension when projecting.
        seed: seed of the projection matrices.
    """
    for name, value in (("d_v", d_v), ("d_t", d_t), ("proj_dim", proj_dim)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if d_v * d_t <= proj_dim:
        return JointEmbedding(d_v=d_v, d_t=d_t, proj_dim=proj_dim, seed=seed)
    a, b = _factor_pair(proj_dim, d_v, d_t)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(a, d_v, generator=gen, dtype=torch.float32) / math.sqrt(a)
    B = torch.randn(b, d_t, generator=gen, dtype=torch.float32) / math.sqrt(b)
    return JointEmbedding(d_v=d_v, d_t=d_t, proj_dim=proj_dim, seed=seed, A=A, B=B)
